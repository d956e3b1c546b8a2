//! The OpenAPI 3.1 document of the HTTP door, generated from the proto's
//! descriptors (the same ones the JSON codec uses), so it cannot drift
//! from what the server accepts: a path per unary RPC (Connect unary, JSON
//! bodies in the proto3 JSON mapping), the SSE stream, and a schema per
//! message, with the proto's comments as descriptions. Served at
//! `GET /openapi.json` and checked in as `docs/openapi.json` (a test
//! regenerates it and compares).

use prost_reflect::{FieldDescriptor, FileDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use super::{connect::SERVICE_PREFIX, json::JsonCodec, sse::EVENTS_PATH};

/// The service the document describes.
const SERVICE: &str = "herald.v1.Notifications";

/// Why the document could not be generated (a build defect).
#[derive(Debug, thiserror::Error)]
#[error("cannot generate the OpenAPI document: {0}")]
pub struct OpenApiError(String);

impl From<OpenApiError> for super::json::DescriptorError {
    fn from(e: OpenApiError) -> Self {
        super::json::DescriptorError::new(e.to_string())
    }
}

/// The document, as pretty-printed JSON text ending in a newline.
pub fn document(codec: &JsonCodec) -> Result<Vec<u8>, OpenApiError> {
    let service = codec
        .pool()
        .get_service_by_name(SERVICE)
        .ok_or_else(|| OpenApiError(format!("no service {SERVICE}")))?;
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for method in service.methods() {
        if method.is_client_streaming() || method.is_server_streaming() {
            continue;
        }
        let (input, output) = (method.input(), method.output());
        collect(&input, &mut schemas);
        collect(&output, &mut schemas);
        paths.insert(
            format!("{SERVICE_PREFIX}{}", method.name()),
            json!({"post": {
                "operationId": method.name(),
                "summary": method.name(),
                "description": comment(&method.parent_file(), method.path()),
                "requestBody": {
                    "required": true,
                    "content": {"application/json": {"schema": reference(&input)}},
                },
                "responses": {
                    "200": {
                        "description": "The response message.",
                        "content": {"application/json": {"schema": reference(&output)}},
                    },
                    "default": error_response(),
                },
            }}),
        );
    }
    collect(
        &codec
            .descriptor("herald.v1.Event")
            .map_err(|e| OpenApiError(e.message().to_owned()))?,
        &mut schemas,
    );
    paths.insert(EVENTS_PATH.to_owned(), events_path());
    schemas.insert(
        "connect.Error".into(),
        json!({
            "type": "object",
            "description": "The Connect protocol's error object. `code` is the gRPC status code's name in snake case (`invalid_argument`, `unauthenticated`, ...), and the HTTP status is the protocol's mapping of it.",
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "array", "items": {"type": "object", "properties": {
                    "type": {"type": "string"},
                    "value": {"type": "string", "description": "The detail message, base64 protobuf."},
                    "debug": {"type": "object"},
                }}},
            },
            "required": ["code"],
        }),
    );
    let doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Herald HTTP API",
            "version": "v1",
            "description": "Every unary RPC of herald.v1.Notifications as a Connect unary call (https://connectrpc.com/docs/protocol): POST a JSON body in the proto3 JSON mapping with `Content-Type: application/json`. The user's event stream is Server-Sent Events at /v1/events. Generated from proto/herald/v1/herald.proto.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
        "security": [{"bearer": []}],
    });
    let mut text = serde_json::to_vec_pretty(&doc).map_err(|e| OpenApiError(e.to_string()))?;
    text.push(b'\n');
    Ok(text)
}

fn error_response() -> Value {
    json!({
        "description": "An error (Connect error object).",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/connect.Error"}}},
    })
}

fn events_path() -> Value {
    json!({"get": {
        "operationId": "Events",
        "summary": "The user's event stream as Server-Sent Events",
        "description": "The stream Subscribe opens, as text/event-stream: a `retry:` hint, then per event `id: <epoch>:<seq>`, `event:` the kind (notification, read, caught_up, resync) and `data:` the herald.v1.Event in the proto3 JSON mapping; heartbeats are `: heartbeat` comments; the server's end of the stream is `event: error` with a Connect error object. Authenticate with `Authorization: Bearer` or a `ticket` from CreateStreamTicket (a resume cookie covers EventSource's own reconnects).",
        "security": [{"bearer": []}, {}],
        "parameters": [
            {"name": "ticket", "in": "query", "schema": {"type": "string"}, "description": "A stream ticket from CreateStreamTicket (single use)."},
            {"name": "last_event_id", "in": "query", "schema": {"type": "string"}, "description": "Resume after this event id (`<epoch>:<seq>`); the Last-Event-ID header wins."},
            {"name": "types", "in": "query", "schema": {"type": "array", "items": {"type": "string"}}, "style": "form", "explode": true, "description": "Only notifications of these types (exact, or `prefix.*`)."},
            {"name": "categories", "in": "query", "schema": {"type": "array", "items": {"type": "string"}}, "style": "form", "explode": true, "description": "Only notifications of these categories."},
            {"name": "min_severity", "in": "query", "schema": {"type": "string", "enum": ["low", "normal", "high", "critical"]}, "description": "Only notifications at least this severe."},
            {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}, "description": "Sent by EventSource when it reconnects: resume after this event id."},
        ],
        "responses": {
            "200": {
                "description": "The event stream.",
                "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/herald.v1.Event"}}},
            },
            "default": error_response(),
        },
    }})
}

fn reference(message: &MessageDescriptor) -> Value {
    json!({"$ref": format!("#/components/schemas/{}", message.full_name())})
}

/// Adds the schema of `message` and of every message it refers to.
fn collect(message: &MessageDescriptor, schemas: &mut Map<String, Value>) {
    if schemas.contains_key(message.full_name()) || well_known(message).is_some() {
        return;
    }
    // Reserve the name first: messages may refer to themselves.
    schemas.insert(message.full_name().to_owned(), Value::Null);
    let mut properties = Map::new();
    for field in message.fields() {
        let mut schema = field_schema(&field, schemas);
        let mut description = comment(&field.parent_file(), field.path());
        if let Some(oneof) = field.containing_oneof()
            && !field.supports_presence()
        {
            description.push_str(&format!(" (One of `{}`.)", oneof.name()));
        }
        if let Value::Object(o) = &mut schema
            && !description.trim().is_empty()
        {
            o.insert(
                "description".into(),
                Value::String(description.trim().to_owned()),
            );
        }
        properties.insert(field.json_name().to_owned(), schema);
    }
    let mut schema =
        json!({"type": "object", "properties": properties, "additionalProperties": false});
    let description = comment(&message.parent_file(), message.path());
    if !description.trim().is_empty() {
        schema["description"] = Value::String(description.trim().to_owned());
    }
    schemas.insert(message.full_name().to_owned(), schema);
}

fn field_schema(field: &FieldDescriptor, schemas: &mut Map<String, Value>) -> Value {
    let item = kind_schema(&field.kind(), schemas);
    if field.is_list() {
        json!({"type": "array", "items": item})
    } else {
        item
    }
}

/// The proto3 JSON mapping of one value of `kind`.
fn kind_schema(kind: &Kind, schemas: &mut Map<String, Value>) -> Value {
    match kind {
        Kind::Double | Kind::Float => json!({"type": "number"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({"type": "integer", "format": "int32"})
        }
        Kind::Uint32 | Kind::Fixed32 => {
            json!({"type": "integer", "format": "uint32", "minimum": 0})
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => json!({
            "type": ["string", "integer"], "format": "int64",
            "description": "64-bit: written as a decimal string, read from a string or a number."}),
        Kind::Uint64 | Kind::Fixed64 => json!({
            "type": ["string", "integer"], "format": "uint64",
            "description": "64-bit: written as a decimal string, read from a string or a number."}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Kind::Enum(e) => {
            json!({"type": "string", "enum": e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>()})
        }
        Kind::Message(m) => match well_known(m) {
            Some(schema) => schema,
            None => {
                collect(m, schemas);
                reference(m)
            }
        },
    }
}

/// The JSON mapping's special forms of the well-known types used.
fn well_known(message: &MessageDescriptor) -> Option<Value> {
    match message.full_name() {
        "google.protobuf.Timestamp" => Some(json!({"type": "string", "format": "date-time"})),
        "google.protobuf.Duration" => Some(json!({
            "type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$",
            "description": "A duration in seconds with an `s` suffix, e.g. `15s` or `1.5s`."})),
        _ => None,
    }
}

/// The leading comment of the element at `path` in `file`, one line.
fn comment(file: &FileDescriptor, path: &[i32]) -> String {
    file.file_descriptor_proto()
        .source_code_info
        .as_ref()
        .and_then(|info| info.location.iter().find(|l| l.path == path))
        .and_then(|l| l.leading_comments.as_deref())
        .map(|c| c.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unary_rpc_has_a_path_and_its_messages_a_schema() {
        let codec = JsonCodec::new().unwrap();
        let doc: Value = serde_json::from_slice(&document(&codec).unwrap()).unwrap();
        for method in super::super::connect::UNARY_METHODS {
            let path = &doc["paths"][format!("{SERVICE_PREFIX}{method}")]["post"];
            assert!(path.is_object(), "{method}");
            assert!(
                path["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{method} has the proto's comment"
            );
            let input = path["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                .as_str()
                .unwrap()
                .trim_start_matches("#/components/schemas/")
                .to_owned();
            assert!(doc["components"]["schemas"][&input].is_object(), "{input}");
        }
        assert!(doc["paths"]["/herald.v1.Notifications/Subscribe"].is_null());
        let send = &doc["components"]["schemas"]["herald.v1.SendNotificationRequest"];
        assert_eq!(send["properties"]["idempotencyKey"]["type"], "string");
        assert_eq!(
            doc["components"]["schemas"]["herald.v1.Notification"]["properties"]["createdAt"]["format"],
            "date-time"
        );
    }
}
