/**
 * Notification filters: the one shape every filtered call takes (`list`,
 * `subscribe`, named counts, `updateState` by filter, `createInbox`), and
 * `matchesFilter()`, the client's copy of the server's matching rule, which
 * the inbox uses to apply a state change made by filter to the
 * notifications it holds.
 */
import { Severity, type NotificationFilter } from "./gen/herald/v1/herald_pb.js";

/**
 * Which notifications a call covers. Each part that is empty or absent
 * lets everything through; together, a notification must pass every part.
 */
export interface FilterOptions {
  /** Only these types: exact, or `prefix.*` patterns (`build.*` matches `build.passed` and `build.a.b`, not `build`). */
  types?: readonly string[];
  /** Only these categories (exact names). */
  categories?: readonly string[];
  /** Only notifications at least this severe. `Severity.UNSPECIFIED` or absent: all. */
  minSeverity?: Severity;
}

/** What `matchesFilter()` looks at in a notification. */
export interface FilterSubject {
  /** The notification's type. */
  readonly type: string;
  /** Its category; empty when none. */
  readonly category: string;
  /** Its severity; `Severity.UNSPECIFIED` counts as `NORMAL`, as the server stores it. */
  readonly severity: Severity;
}

/**
 * Whether `notification` passes `filter`, by the server's rule (see
 * `SubscribeRequest.types` in the proto): a type passes when it equals an
 * entry, or starts with the prefix of a `prefix.*` entry followed by its
 * dot; a category when it equals an entry; a severity when it is at least
 * `minSeverity`. Takes a `FilterOptions` or a `NotificationFilter` message
 * (as a `state` event carries it).
 */
export function matchesFilter(
  filter: FilterOptions | NotificationFilter | undefined,
  notification: FilterSubject,
): boolean {
  if (!filter) return true;
  const types = filter.types ?? [];
  const typed =
    types.length === 0 ||
    types.some((t) =>
      t.endsWith(".*") ? notification.type.startsWith(t.slice(0, -1)) : notification.type === t,
    );
  if (!typed) return false;
  const categories = filter.categories ?? [];
  if (categories.length > 0 && !categories.includes(notification.category)) return false;
  const min = filter.minSeverity ?? Severity.UNSPECIFIED;
  const severity = notification.severity === Severity.UNSPECIFIED ? Severity.NORMAL : notification.severity;
  return min === Severity.UNSPECIFIED || severity >= min;
}

/** Whether `filter` lets every notification through (no part set). */
export function isFilterEmpty(filter: FilterOptions | undefined): boolean {
  return (
    !filter ||
    ((filter.types ?? []).length === 0 &&
      (filter.categories ?? []).length === 0 &&
      (filter.minSeverity ?? Severity.UNSPECIFIED) === Severity.UNSPECIFIED)
  );
}

/** The filter as request fields (copies; absent parts empty). */
export function filterFields(filter: FilterOptions | undefined): {
  types: string[];
  categories: string[];
  minSeverity: Severity;
} {
  return {
    types: [...(filter?.types ?? [])],
    categories: [...(filter?.categories ?? [])],
    minSeverity: filter?.minSeverity ?? Severity.UNSPECIFIED,
  };
}
