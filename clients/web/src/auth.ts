/**
 * Bearer tokens: where `subscribe()` and the call helpers get them, and how
 * they are attached to a call.
 */

/** What a token provider is asked for. */
export interface TokenRequest {
  /**
   * True when the server has just refused the previous token
   * (UNAUTHENTICATED): return a newly obtained token, not a cached one.
   */
  forceRefresh: boolean;
}

/**
 * Returns the bearer token (a JWT, without the `Bearer ` prefix) to call
 * Herald with. Called before every (re)connect of a stream and before every
 * helper call, so it should be cheap when it has a valid cached token.
 * An empty string, `null` or `undefined` sends no `authorization` header
 * (the server answers UNAUTHENTICATED). A rejected promise or a thrown error
 * counts as a failed connection attempt (the stream retries with backoff).
 */
export type TokenProvider = (
  request: TokenRequest,
) => string | null | undefined | Promise<string | null | undefined>;

/**
 * The request headers carrying `token`: `{ authorization: "Bearer <token>" }`,
 * or no header for an empty/absent token.
 */
export function authHeaders(token: string | null | undefined): Record<string, string> {
  return token ? { authorization: `Bearer ${token}` } : {};
}
