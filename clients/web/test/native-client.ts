/**
 * Native gRPC (HTTP/2) access to Herald for the browser test's sender side:
 * bundled by test/browser.mjs with esbuild and imported from there.
 */
import { createHmac } from "node:crypto";
import { createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { Notifications } from "../src/gen/herald/v1/herald_pb.js";

/** A typed Herald client over native gRPC (h2c) to `baseUrl`, e.g. `http://127.0.0.1:50051`. */
export function nativeClient(baseUrl: string): Client<typeof Notifications> {
  return createClient(Notifications, createGrpcTransport({ baseUrl }));
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
