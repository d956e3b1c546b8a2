import { Code, ConnectError } from "@connectrpc/connect";

/**
 * gRPC status code names as the gRPC status-code guide spells them
 * (`UNAUTHENTICATED`, `INVALID_ARGUMENT`, …), indexed by numeric code.
 */
const CODE_NAMES: Readonly<Record<number, string>> = {
  0: "OK",
  [Code.Canceled]: "CANCELLED",
  [Code.Unknown]: "UNKNOWN",
  [Code.InvalidArgument]: "INVALID_ARGUMENT",
  [Code.DeadlineExceeded]: "DEADLINE_EXCEEDED",
  [Code.NotFound]: "NOT_FOUND",
  [Code.AlreadyExists]: "ALREADY_EXISTS",
  [Code.PermissionDenied]: "PERMISSION_DENIED",
  [Code.ResourceExhausted]: "RESOURCE_EXHAUSTED",
  [Code.FailedPrecondition]: "FAILED_PRECONDITION",
  [Code.Aborted]: "ABORTED",
  [Code.OutOfRange]: "OUT_OF_RANGE",
  [Code.Unimplemented]: "UNIMPLEMENTED",
  [Code.Internal]: "INTERNAL",
  [Code.Unavailable]: "UNAVAILABLE",
  [Code.DataLoss]: "DATA_LOSS",
  [Code.Unauthenticated]: "UNAUTHENTICATED",
};

/**
 * The gRPC name of a status code, e.g. `codeName(Code.Unauthenticated)` is
 * `"UNAUTHENTICATED"`. Unknown numbers give `"CODE_<n>"`.
 */
export function codeName(code: Code | number): string {
  return CODE_NAMES[code] ?? `CODE_${code}`;
}

/**
 * An error from a Herald call or stream, with its gRPC status.
 *
 * `code` is the numeric gRPC code (`Code` from `@connectrpc/connect`),
 * `codeName` its name (`"UNAUTHENTICATED"`), `rawMessage` the server's status
 * message without decoration (for INVALID_ARGUMENT it starts with the
 * offending field). Transport failures that carry no gRPC status (connection
 * refused, a CORS refusal, a network drop) have the code the transport gave
 * them, usually UNKNOWN or UNAVAILABLE. `message` is
 * `"<CODE_NAME>: <rawMessage>"`.
 */
export class HeraldError extends Error {
  /** Numeric gRPC status code. */
  readonly code: Code;
  /** gRPC name of `code`, e.g. `"UNAVAILABLE"`. */
  readonly codeName: string;
  /** The status message as the server (or transport) gave it. */
  readonly rawMessage: string;

  /**
   * @param code gRPC status code.
   * @param rawMessage status message without the code prefix.
   * @param options `cause`: the underlying error, when there is one.
   */
  constructor(code: Code, rawMessage: string, options?: { cause?: unknown }) {
    super(`${codeName(code)}: ${rawMessage}`, options);
    this.name = "HeraldError";
    this.code = code;
    this.codeName = codeName(code);
    this.rawMessage = rawMessage;
  }
}

/**
 * Converts anything thrown by a Connect call (a `ConnectError`, a fetch
 * `TypeError`, an `AbortError`, …) into a `HeraldError`. A `HeraldError` is
 * returned as is.
 */
export function toHeraldError(error: unknown): HeraldError {
  if (error instanceof HeraldError) return error;
  const ce = ConnectError.from(error);
  return new HeraldError(ce.code, ce.rawMessage, { cause: error });
}

/**
 * What a stream does after an error:
 * - `"refresh-token"`: UNAUTHENTICATED — ask for a fresh token and retry once;
 * - `"stop"`: INVALID_ARGUMENT — retrying the same request cannot succeed;
 * - `"retry"`: anything else (UNAVAILABLE, transport failures, …) —
 *   reconnect with backoff.
 */
export type ErrorAction = "refresh-token" | "stop" | "retry";

/** Classifies a stream error into the action `subscribe()` takes. */
export function classifyError(error: HeraldError): ErrorAction {
  switch (error.code) {
    case Code.Unauthenticated:
      return "refresh-token";
    case Code.InvalidArgument:
      return "stop";
    default:
      return "retry";
  }
}
