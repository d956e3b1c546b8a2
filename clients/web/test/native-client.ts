/**
 * Herald from Node for the browser tests' sender side — native gRPC (HTTP/2)
 * and the Connect protocol with JSON over HTTP/1.1 — bundled by
 * test/harness.mjs with esbuild and imported from there.
 */
import { createHmac } from "node:crypto";
import { createClient, type Client } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { Notifications } from "../src/gen/herald/v1/herald_pb.js";

/** A typed Herald client over native gRPC (h2c) to `baseUrl`, e.g. `http://127.0.0.1:50051`. */
export function nativeClient(baseUrl: string): Client<typeof Notifications> {
  return createClient(Notifications, createGrpcTransport({ baseUrl }));
}

/**
 * A typed Herald client speaking the Connect protocol with JSON bodies over
 * HTTP/1.1 to `baseUrl`: what Herald's HTTP door serves to callers without
 * gRPC, through Connect-ES's own implementation of the protocol.
 */
export function connectJsonClient(baseUrl: string): Client<typeof Notifications> {
  return createClient(
    Notifications,
    createConnectTransport({ baseUrl, httpVersion: "1.1", useBinaryFormat: false }),
  );
}

/**
 * An HS256 JWT like `herald token` mints: `sub`, optional `scope`, `iat`,
 * `exp` = now + `ttlSeconds` (default 3600).
 */
export function mintToken(secret: string, sub: string, scope = "", ttlSeconds = 3600): string {
  const now = Math.floor(Date.now() / 1000);
  const b64 = (value: object | Buffer): string =>
    (Buffer.isBuffer(value) ? value : Buffer.from(JSON.stringify(value))).toString("base64url");
  const claims: Record<string, unknown> = { sub, exp: now + ttlSeconds, iat: now };
  if (scope) claims.scope = scope;
  const unsigned = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${unsigned}.${b64(createHmac("sha256", secret).update(unsigned).digest())}`;
}
