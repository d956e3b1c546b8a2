//! The HTTP door: the API for callers without gRPC, on the gRPC port.
//!
//! - **Connect unary calls** ([`connect`]): `POST
//!   /herald.v1.Notifications/<Method>` with a JSON (or binary protobuf)
//!   body, for every unary RPC, from the same proto and the same handlers
//!   as gRPC.
//! - **Server-Sent Events** ([`sse`]): `GET /v1/events`, the user's event
//!   stream for `EventSource` and `curl -N`.
//! - **The OpenAPI document** ([`openapi`]): `GET /openapi.json`,
//!   generated from the proto (checked in as `docs/openapi.json`).
//!
//! [`DoorLayer`] sends these requests to the door and everything else
//! (gRPC, grpc-web: `Content-Type: application/grpc…`) on to the gRPC
//! services, so one port serves all of them behind the same CORS, request
//! id and tracing layers.

pub mod connect;
pub mod json;
pub mod openapi;
pub mod sse;

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body_util::Full;
use tonic::body::Body;
use tower::{Layer, Service};

use self::json::JsonCodec;
use crate::{api::NotificationsService, store::Store};

/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/openapi.json";

/// The door's bounds and the origins allowed to use the SSE resume cookie.
#[derive(Debug, Clone)]
pub struct DoorSettings {
    /// Largest request body, bytes (the gRPC request size limit).
    pub max_request_bytes: usize,
    /// Time for the whole request body.
    pub request_body_timeout: Duration,
    /// Time for a unary call's answer.
    pub call_timeout: Duration,
    /// The CORS origins (exact `scheme://host[:port]`).
    pub cors_origins: Vec<String>,
}

/// What the door needs, shared by every connection.
pub struct Door<S> {
    service: Arc<NotificationsService<S>>,
    codec: JsonCodec,
    settings: DoorSettings,
    openapi: Bytes,
}

impl<S: Store> Door<S> {
    /// The door to `service`.
    pub fn new(
        service: Arc<NotificationsService<S>>,
        settings: DoorSettings,
    ) -> Result<Self, json::DescriptorError> {
        let codec = JsonCodec::new()?;
        let openapi = Bytes::from(openapi::document(&codec).map_err(json::DescriptorError::from)?);
        Ok(Self {
            service,
            codec,
            settings,
            openapi,
        })
    }

    /// Serves a request [`route`] gave the door.
    async fn serve(&self, route: DoorRoute, request: Request<Body>) -> Response<Body> {
        match route {
            DoorRoute::Connect(method) => {
                connect::call(&self.service, &self.codec, &self.settings, &method, request).await
            }
            DoorRoute::Events => {
                sse::events(&self.service, &self.codec, &self.settings, request).await
            }
            DoorRoute::OpenApi => {
                let mut response = Response::new(Body::new(Full::new(self.openapi.clone())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                response
            }
        }
    }
}

/// What the door serves.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DoorRoute {
    /// A Connect unary call of this method.
    Connect(String),
    /// The SSE stream.
    Events,
    /// The OpenAPI document.
    OpenApi,
}

/// Sorts a request: the door's paths, and the service's procedures unless
/// the content type is gRPC's (`application/grpc`, `application/grpc+proto`,
/// grpc-web's `application/grpc-web…`); `None` (on to gRPC) for the rest.
fn route<B>(request: &Request<B>) -> Option<DoorRoute> {
    let path = request.uri().path();
    if path == sse::EVENTS_PATH {
        return Some(DoorRoute::Events);
    }
    if path == OPENAPI_PATH && request.method() == http::Method::GET {
        return Some(DoorRoute::OpenApi);
    }
    let method = path.strip_prefix(connect::SERVICE_PREFIX)?;
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    (!grpc).then(|| DoorRoute::Connect(method.to_owned()))
}

/// A [`tower::Layer`] that puts the door in front of the gRPC services.
pub struct DoorLayer<S> {
    door: Arc<Door<S>>,
}

impl<S> DoorLayer<S> {
    /// The layer for `door`.
    pub fn new(door: Door<S>) -> Self {
        Self {
            door: Arc::new(door),
        }
    }
}

impl<S> Clone for DoorLayer<S> {
    fn clone(&self) -> Self {
        Self {
            door: self.door.clone(),
        }
    }
}

impl<S, G> Layer<G> for DoorLayer<S> {
    type Service = DoorService<S, G>;

    fn layer(&self, grpc: G) -> Self::Service {
        DoorService {
            door: self.door.clone(),
            grpc,
        }
    }
}

/// The service of [`DoorLayer`].
pub struct DoorService<S, G> {
    door: Arc<Door<S>>,
    grpc: G,
}

impl<S, G: Clone> Clone for DoorService<S, G> {
    fn clone(&self) -> Self {
        Self {
            door: self.door.clone(),
            grpc: self.grpc.clone(),
        }
    }
}

impl<S, G> Service<Request<Body>> for DoorService<S, G>
where
    S: Store,
    G: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    G::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.grpc.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        match route(&request) {
            None => {
                // The clone that was made ready is the one called.
                let ready = self.grpc.clone();
                let mut grpc = std::mem::replace(&mut self.grpc, ready);
                Box::pin(grpc.call(request))
            }
            Some(route) => {
                let door = self.door.clone();
                Box::pin(async move { Ok(door.serve(route, request).await) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str, content_type: Option<&str>) -> Request<()> {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(ct) = content_type {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn requests_are_routed_by_path_and_content_type() {
        let send = "/herald.v1.Notifications/SendNotification";
        assert_eq!(
            route(&request("POST", send, Some("application/json"))),
            Some(DoorRoute::Connect("SendNotification".into()))
        );
        assert_eq!(
            route(&request("POST", send, None)),
            Some(DoorRoute::Connect("SendNotification".into()))
        );
        for grpc in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc-web+proto",
        ] {
            assert_eq!(route(&request("POST", send, Some(grpc))), None);
        }
        assert_eq!(
            route(&request(
                "POST",
                "/grpc.health.v1.Health/Check",
                Some("application/json")
            )),
            None
        );
        assert_eq!(
            route(&request("GET", "/v1/events", None)),
            Some(DoorRoute::Events)
        );
        assert_eq!(
            route(&request("GET", "/openapi.json", None)),
            Some(DoorRoute::OpenApi)
        );
    }
}
