//! The domain: what a notification is, what a user's event stream carries,
//! and the parsing that turns untrusted request fields into values that can
//! only exist valid. Handlers parse; nothing downstream re-checks.

use std::{
    collections::HashSet,
    fmt,
    time::{Duration, SystemTime},
};

use crate::proto;

/// Longest user id, tenant, type or idempotency key, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest title, in bytes.
pub const MAX_TITLE_BYTES: usize = 512;
/// Longest category, in bytes.
pub const MAX_CATEGORY_BYTES: usize = 64;
/// Most actions (buttons) on one notification.
pub const MAX_ACTIONS: usize = 5;
/// Longest action label, in bytes.
pub const MAX_ACTION_LABEL_BYTES: usize = 64;
/// Longest `action_url` or action URL, in bytes.
pub const MAX_URL_BYTES: usize = 2_048;

/// A request field that failed to parse. Maps to `INVALID_ARGUMENT`, with
/// the field named first in the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidArgument {
    /// The proto field name, e.g. `recipients[2]`.
    pub field: String,
    /// What is wrong with it, in a sentence fragment.
    pub reason: String,
}

impl InvalidArgument {
    /// Builds the error for `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Limits on a send, set by the server's configuration.
#[derive(Debug, Clone, Copy)]
pub struct SendLimits {
    /// Most distinct recipients of one send.
    pub max_recipients: usize,
    /// Most items of one `SendNotifications` call.
    pub max_bulk_items: usize,
    /// Longest `body`, in bytes.
    pub max_body_bytes: usize,
    /// Longest `data` JSON text, in bytes.
    pub max_data_bytes: usize,
    /// Deepest nesting of objects and arrays in `data` (the top-level
    /// object is depth 1).
    pub max_data_depth: usize,
}

impl Default for SendLimits {
    fn default() -> Self {
        Self {
            max_recipients: 1_000,
            max_bulk_items: 1_000,
            max_body_bytes: 16 * 1024,
            max_data_bytes: 16 * 1024,
            max_data_depth: 16,
        }
    }
}

/// Checks a name-like field: 1 to [`MAX_NAME_BYTES`] bytes, no control
/// characters.
fn parse_name(field: &str, value: &str) -> Result<String, InvalidArgument> {
    if value.is_empty() {
        return Err(InvalidArgument::new(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(InvalidArgument::new(
            field,
            format!("is {} bytes, longer than {MAX_NAME_BYTES}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(InvalidArgument::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(value.to_owned())
}

/// A user id: the `sub` of the user's tokens. 1 to 128 bytes, no control
/// characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

impl UserId {
    /// Parses `value`, naming `field` in the error.
    pub fn parse(field: &str, value: &str) -> Result<Self, InvalidArgument> {
        parse_name(field, value).map(Self)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tenant: the `tenant` claim of a token, or the empty string for tokens
/// without one. At most 128 bytes, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Tenant(String);

impl Tenant {
    /// Parses a tenant claim (empty allowed: the default tenant).
    pub fn parse(value: &str) -> Result<Self, InvalidArgument> {
        if value.is_empty() {
            return Ok(Self::default());
        }
        parse_name("tenant", value).map(Self)
    }

    /// The tenant as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How urgent a notification is (`herald.v1.Severity`). Ordered: `Low` <
/// `Normal` < `High` < `Critical`, so "at least high" is a comparison.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Can wait.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Needs attention soon.
    High,
    /// Needs attention now.
    Critical,
}

impl Severity {
    /// From the proto enum's number: 0 (unspecified) is `Normal`; a number
    /// this server does not know is an error naming `field`.
    pub fn from_proto(field: &str, value: i32) -> Result<Self, InvalidArgument> {
        match proto::Severity::try_from(value) {
            Ok(proto::Severity::Unspecified | proto::Severity::Normal) => Ok(Self::Normal),
            Ok(proto::Severity::Low) => Ok(Self::Low),
            Ok(proto::Severity::High) => Ok(Self::High),
            Ok(proto::Severity::Critical) => Ok(Self::Critical),
            Err(_) => Err(InvalidArgument::new(
                field,
                format!("{value} is not a known severity (1 low, 2 normal, 3 high, 4 critical)"),
            )),
        }
    }

    /// The proto enum.
    pub fn to_proto(self) -> proto::Severity {
        match self {
            Self::Low => proto::Severity::Low,
            Self::Normal => proto::Severity::Normal,
            Self::High => proto::Severity::High,
            Self::Critical => proto::Severity::Critical,
        }
    }

    /// As stored (`contents.severity`): the proto number.
    pub fn as_i16(self) -> i16 {
        self.to_proto() as i16
    }

    /// From a stored number; one this version does not know reads as
    /// `Normal` (a newer replica may have written it).
    pub fn from_i16(value: i16) -> Self {
        Self::from_proto("severity", i32::from(value)).unwrap_or_default()
    }

    fn is_normal(&self) -> bool {
        *self == Self::Normal
    }
}

/// Most entries in a filter's `types` or `categories`.
pub const MAX_FILTER_ENTRIES: usize = 64;

/// Which notifications a stream, a listing or a count covers: types (exact,
/// or prefixes from `prefix.*` patterns), categories, and a minimum
/// severity. Each part that is empty (or unspecified) lets everything
/// through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotificationFilter {
    /// Exact types.
    pub types: Vec<String>,
    /// Type prefixes, each ending in `.` (from patterns `prefix.*`).
    pub type_prefixes: Vec<String>,
    /// Exact categories.
    pub categories: Vec<String>,
    /// The least severity let through; `None` for all.
    pub min_severity: Option<Severity>,
}

impl NotificationFilter {
    /// Parses a request's filter fields; errors name `{field_prefix}types[i]`,
    /// `{field_prefix}categories[i]` or `{field_prefix}min_severity`.
    pub fn parse(
        field_prefix: &str,
        types: &[String],
        categories: &[String],
        min_severity: i32,
    ) -> Result<Self, InvalidArgument> {
        let mut filter = Self::default();
        for (list, what) in [(types, "types"), (categories, "categories")] {
            if list.len() > MAX_FILTER_ENTRIES {
                return Err(InvalidArgument::new(
                    format!("{field_prefix}{what}"),
                    format!(
                        "names {} entries, more than {MAX_FILTER_ENTRIES}",
                        list.len()
                    ),
                ));
            }
        }
        for (i, t) in types.iter().enumerate() {
            let field = format!("{field_prefix}types[{i}]");
            match t.strip_suffix(".*") {
                Some(prefix) => {
                    let prefix = NotificationType::parse(&field, prefix)?;
                    filter.type_prefixes.push(format!("{}.", prefix.as_str()));
                }
                None => filter
                    .types
                    .push(NotificationType::parse(&field, t)?.as_str().to_owned()),
            }
        }
        for (i, c) in categories.iter().enumerate() {
            let field = format!("{field_prefix}categories[{i}]");
            filter
                .categories
                .push(NotificationType::parse(&field, c)?.as_str().to_owned());
        }
        if min_severity != proto::Severity::Unspecified as i32 {
            filter.min_severity = Some(Severity::from_proto(
                &format!("{field_prefix}min_severity"),
                min_severity,
            )?);
        }
        Ok(filter)
    }

    /// As the proto message: exact types, then each prefix as its
    /// `prefix.*` pattern.
    pub fn to_proto(&self) -> proto::NotificationFilter {
        proto::NotificationFilter {
            types: self
                .types
                .iter()
                .cloned()
                .chain(self.type_prefixes.iter().map(|p| format!("{p}*")))
                .collect(),
            categories: self.categories.clone(),
            min_severity: self
                .min_severity
                .map_or(proto::Severity::Unspecified, Severity::to_proto)
                as i32,
        }
    }

    /// Whether it lets every notification through.
    pub fn is_all(&self) -> bool {
        *self == Self::default()
    }

    /// Whether a notification with `content` passes.
    pub fn matches(&self, content: &Content) -> bool {
        let typed = (self.types.is_empty() && self.type_prefixes.is_empty())
            || self.types.contains(&content.kind)
            || self
                .type_prefixes
                .iter()
                .any(|p| content.kind.starts_with(p.as_str()));
        typed
            && (self.categories.is_empty()
                || self.categories.contains(&content.presentation.category))
            && self
                .min_severity
                .is_none_or(|min| content.presentation.severity >= min)
    }
}

/// A button on a notification.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Action {
    /// What it says, 1 to [`MAX_ACTION_LABEL_BYTES`] bytes.
    #[serde(rename = "l")]
    pub label: String,
    /// Where it leads (see [`parse_link`]).
    #[serde(rename = "u")]
    pub url: String,
}

/// How a notification presents itself beyond its text: its category,
/// severity, who caused it, where it leads and its buttons. Part of the
/// content a send's recipients share. (Short serde names: it travels in
/// NOTIFY payloads; defaults are left out.)
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Presentation {
    /// Empty, or a name like a type's, at most [`MAX_CATEGORY_BYTES`].
    #[serde(rename = "c", default, skip_serializing_if = "String::is_empty")]
    pub category: String,
    /// Urgency.
    #[serde(rename = "s", default, skip_serializing_if = "Severity::is_normal")]
    pub severity: Severity,
    /// Who caused it: the sender's `actor`, or the sending token's user.
    #[serde(rename = "a", default, skip_serializing_if = "String::is_empty")]
    pub actor: String,
    /// Where opening it leads; empty for nowhere.
    #[serde(rename = "u", default, skip_serializing_if = "String::is_empty")]
    pub action_url: String,
    /// Buttons, at most [`MAX_ACTIONS`].
    #[serde(rename = "x", default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<Action>,
}

impl Presentation {
    /// Fills in the actor, when the sender named none, with the sending
    /// token's user.
    pub fn default_actor(&mut self, sender: &UserId) {
        if self.actor.is_empty() {
            self.actor = sender.as_str().to_owned();
        }
    }

    /// Whether every field has its default (nothing to carry).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The actions as stored (`contents.actions`, JSON text of
    /// `[{"l":…,"u":…}]`); empty text for none.
    pub fn actions_json(&self) -> String {
        if self.actions.is_empty() {
            String::new()
        } else {
            serde_json::to_string(&self.actions).unwrap_or_default()
        }
    }

    /// Actions from their stored JSON text (empty or unreadable: none).
    pub fn actions_from_json(text: &str) -> Vec<Action> {
        if text.is_empty() {
            return Vec::new();
        }
        serde_json::from_str(text).unwrap_or_default()
    }

    /// Parses a send's presentation fields. `actor` stays empty when the
    /// request gave none (the caller fills in the token's user).
    fn parse(req: &mut proto::SendNotificationRequest) -> Result<Self, InvalidArgument> {
        let category = if req.category.is_empty() {
            String::new()
        } else {
            let c = NotificationType::parse("category", &req.category)?;
            if c.as_str().len() > MAX_CATEGORY_BYTES {
                return Err(InvalidArgument::new(
                    "category",
                    format!(
                        "is {} bytes, longer than {MAX_CATEGORY_BYTES}",
                        c.as_str().len()
                    ),
                ));
            }
            c.0
        };
        let severity = Severity::from_proto("severity", req.severity)?;
        let actor = if req.actor.is_empty() {
            String::new()
        } else {
            parse_name("actor", &req.actor)?
        };
        let action_url = if req.action_url.is_empty() {
            String::new()
        } else {
            parse_link("action_url", &req.action_url)?
        };
        if req.actions.len() > MAX_ACTIONS {
            return Err(InvalidArgument::new(
                "actions",
                format!("has {} actions, more than {MAX_ACTIONS}", req.actions.len()),
            ));
        }
        let mut actions = Vec::with_capacity(req.actions.len());
        for (i, a) in std::mem::take(&mut req.actions).into_iter().enumerate() {
            let field = format!("actions[{i}].label");
            if a.label.is_empty() {
                return Err(InvalidArgument::new(field, "must not be empty"));
            }
            if a.label.len() > MAX_ACTION_LABEL_BYTES {
                return Err(InvalidArgument::new(
                    field,
                    format!(
                        "is {} bytes, longer than {MAX_ACTION_LABEL_BYTES}",
                        a.label.len()
                    ),
                ));
            }
            if a.label.chars().any(char::is_control) {
                return Err(InvalidArgument::new(
                    field,
                    "must not contain control characters",
                ));
            }
            let url = parse_link(&format!("actions[{i}].url"), &a.url)?;
            actions.push(Action {
                label: a.label,
                url,
            });
        }
        Ok(Self {
            category,
            severity,
            actor,
            action_url,
            actions,
        })
    }
}

/// Parses a link: an absolute `http` or `https` URL (WHATWG URL Standard,
/// as the `url` crate parses it), or a path on the app's own origin
/// starting with a single `/`; at most [`MAX_URL_BYTES`], no whitespace or
/// control characters. Returned as given.
pub fn parse_link(field: &str, value: &str) -> Result<String, InvalidArgument> {
    if value.is_empty() {
        return Err(InvalidArgument::new(field, "must not be empty"));
    }
    if value.len() > MAX_URL_BYTES {
        return Err(InvalidArgument::new(
            field,
            format!("is {} bytes, longer than {MAX_URL_BYTES}", value.len()),
        ));
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(InvalidArgument::new(
            field,
            "must not contain whitespace or control characters",
        ));
    }
    if value.starts_with('/') && !value.starts_with("//") {
        return Ok(value.to_owned());
    }
    match url::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => Ok(value.to_owned()),
        Ok(u) => Err(InvalidArgument::new(
            field,
            format!(
                "scheme {:?} is not allowed; use http, https or a path starting with /",
                u.scheme()
            ),
        )),
        Err(e) => Err(InvalidArgument::new(
            field,
            format!("is neither an absolute http(s) URL ({e}) nor a path starting with /"),
        )),
    }
}

/// A notification type such as `project.created`: 1 to 128 bytes of ASCII
/// letters, digits and `. _ - : /`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NotificationType(String);

impl NotificationType {
    /// Parses `value`, naming `field` in the error.
    pub fn parse(field: &str, value: &str) -> Result<Self, InvalidArgument> {
        let value = parse_name(field, value)?;
        if let Some(bad) = value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/')))
        {
            return Err(InvalidArgument::new(
                field,
                format!("contains {bad:?}; allowed are ASCII letters, digits and . _ - : /"),
            ));
        }
        Ok(Self(value))
    }

    /// The type as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated `SendNotification` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewNotification {
    /// Distinct recipients, in the order first named.
    pub recipients: Vec<UserId>,
    /// The event type.
    pub kind: NotificationType,
    /// Headline, 1 to [`MAX_TITLE_BYTES`] bytes.
    pub title: String,
    /// Body text, possibly empty.
    pub body: String,
    /// Compact JSON text of an object.
    pub data: String,
    /// Category, severity, actor and links.
    pub presentation: Presentation,
    /// The caller's idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// How it lands on a recipient's related notification, if at all.
    pub fold: Option<Fold>,
    /// When it updates a notification: make it unread and unseen again.
    pub renotify: bool,
    /// When it stops mattering, if ever.
    pub expires_at: Option<SystemTime>,
    /// When to deliver it, if later than now (see [`NewNotification::check_times`]).
    pub deliver_at: Option<SystemTime>,
}

/// How far in the past a `deliver_at` may be and still mean "now" (clock
/// skew between the caller and the server).
pub const DELIVER_AT_TOLERANCE: Duration = Duration::from_secs(60);
/// Furthest ahead a send may be scheduled.
pub const MAX_SCHEDULE_AHEAD: Duration = Duration::from_secs(366 * 24 * 3600);

/// A protobuf timestamp as a time, naming `field` when it is not one
/// (nanos out of range, or before the Unix epoch).
fn parse_time(
    field: &str,
    t: Option<prost_types::Timestamp>,
) -> Result<Option<SystemTime>, InvalidArgument> {
    match t {
        None => Ok(None),
        Some(t) => SystemTime::try_from(t)
            .ok()
            .filter(|t| *t >= SystemTime::UNIX_EPOCH)
            .map(Some)
            .ok_or_else(|| InvalidArgument::new(field, "is not a valid time")),
    }
}

/// Most actors a group remembers (newest first).
pub const MAX_GROUP_ACTORS: usize = 5;
/// Shortest `group_window`.
pub const MIN_GROUP_WINDOW: Duration = Duration::from_secs(1);
/// Longest `group_window`.
pub const MAX_GROUP_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// How a send lands on a recipient who already has a related
/// notification: it updates that one instead of adding another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fold {
    /// Replace the content of the recipient's notification with this key.
    Replace(String),
    /// Fold into the recipient's group with this key opened less than
    /// `window` ago.
    Group {
        /// The group key.
        key: String,
        /// How long a group stays open, from its first send.
        window: Duration,
    },
}

impl Fold {
    /// Parses `replace_key`, `group_key`, `group_window` and checks
    /// `renotify` against them; errors name the field.
    fn parse(req: &proto::SendNotificationRequest) -> Result<Option<Self>, InvalidArgument> {
        let fold = match (req.replace_key.is_empty(), req.group_key.is_empty()) {
            (true, true) => None,
            (false, false) => {
                return Err(InvalidArgument::new(
                    "group_key",
                    "cannot be combined with replace_key",
                ));
            }
            (false, true) => Some(Self::Replace(
                NotificationType::parse("replace_key", &req.replace_key)?
                    .as_str()
                    .to_owned(),
            )),
            (true, false) => {
                let key = NotificationType::parse("group_key", &req.group_key)?;
                let window = req
                    .group_window
                    .and_then(|d| Duration::try_from(d).ok())
                    .filter(|w| (MIN_GROUP_WINDOW..=MAX_GROUP_WINDOW).contains(w))
                    .ok_or_else(|| {
                        InvalidArgument::new("group_window", "must be from 1 s to 7 days")
                    })?;
                Some(Self::Group {
                    key: key.as_str().to_owned(),
                    window,
                })
            }
        };
        if fold.is_none() && req.group_window.is_some() {
            return Err(InvalidArgument::new("group_window", "needs group_key"));
        }
        if fold.is_none() && req.renotify {
            return Err(InvalidArgument::new(
                "renotify",
                "needs replace_key or group_key",
            ));
        }
        Ok(fold)
    }

    /// The key, whichever kind.
    pub fn key(&self) -> &str {
        match self {
            Self::Replace(key) | Self::Group { key, .. } => key,
        }
    }
}

/// A group's state on one recipient's notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// How many sends it holds, at least 1.
    pub count: u32,
    /// Distinct actors of its sends, newest first, at most
    /// [`MAX_GROUP_ACTORS`].
    pub actors: Vec<String>,
}

impl Group {
    /// A group opened by a send of `actor`.
    pub fn open(actor: &str) -> Self {
        Self {
            count: 1,
            actors: vec![actor.to_owned()],
        }
    }

    /// This group with one more send, of `actor`.
    pub fn fold(&self, actor: &str) -> Self {
        let mut actors = Vec::with_capacity(MAX_GROUP_ACTORS);
        actors.push(actor.to_owned());
        actors.extend(
            self.actors
                .iter()
                .filter(|a| *a != actor)
                .take(MAX_GROUP_ACTORS - 1)
                .cloned(),
        );
        Self {
            count: self.count.saturating_add(1),
            actors,
        }
    }
}

impl NewNotification {
    /// Parses a request. Errors name the first offending field.
    pub fn parse(
        mut req: proto::SendNotificationRequest,
        limits: &SendLimits,
    ) -> Result<Self, InvalidArgument> {
        if req.recipients.is_empty() {
            return Err(InvalidArgument::new(
                "recipients",
                "must name at least one user",
            ));
        }
        let mut seen = HashSet::with_capacity(req.recipients.len());
        let mut recipients = Vec::with_capacity(req.recipients.len());
        for (i, r) in req.recipients.iter().enumerate() {
            let user = UserId::parse(&format!("recipients[{i}]"), r)?;
            if seen.insert(user.clone()) {
                recipients.push(user);
            }
        }
        if recipients.len() > limits.max_recipients {
            return Err(InvalidArgument::new(
                "recipients",
                format!(
                    "names {} users, more than the limit of {}",
                    recipients.len(),
                    limits.max_recipients
                ),
            ));
        }
        let kind = NotificationType::parse("type", &req.r#type)?;
        if req.title.is_empty() {
            return Err(InvalidArgument::new("title", "must not be empty"));
        }
        if req.title.len() > MAX_TITLE_BYTES {
            return Err(InvalidArgument::new(
                "title",
                format!(
                    "is {} bytes, longer than {MAX_TITLE_BYTES}",
                    req.title.len()
                ),
            ));
        }
        // PostgreSQL text cannot hold NUL (docs, "Character Types").
        for (field, text) in [("title", &req.title), ("body", &req.body)] {
            if text.contains('\0') {
                return Err(InvalidArgument::new(
                    field,
                    "must not contain NUL characters",
                ));
            }
        }
        if req.body.len() > limits.max_body_bytes {
            return Err(InvalidArgument::new(
                "body",
                format!(
                    "is {} bytes, longer than {}",
                    req.body.len(),
                    limits.max_body_bytes
                ),
            ));
        }
        let data = parse_data(&req.data, limits.max_data_bytes, limits.max_data_depth)?;
        let presentation = Presentation::parse(&mut req)?;
        let idempotency_key = if req.idempotency_key.is_empty() {
            None
        } else {
            Some(Self::parse_idempotency_key(&req.idempotency_key)?)
        };
        let fold = Fold::parse(&req)?;
        let expires_at = parse_time("expires_at", req.expires_at)?;
        let deliver_at = parse_time("deliver_at", req.deliver_at)?;
        Ok(Self {
            recipients,
            kind,
            title: req.title,
            body: req.body,
            data,
            presentation,
            idempotency_key,
            fold,
            renotify: req.renotify,
            expires_at,
            deliver_at,
        })
    }

    /// Parses an idempotency key: 1 to [`MAX_NAME_BYTES`] bytes, no control
    /// characters; errors name `idempotency_key`.
    pub fn parse_idempotency_key(key: &str) -> Result<String, InvalidArgument> {
        parse_name("idempotency_key", key)
    }

    /// Checks `deliver_at` and `expires_at` against `now` (the server's
    /// clock): a `deliver_at` up to [`DELIVER_AT_TOLERANCE`] in the past,
    /// or not after `now`, means now (and is cleared); earlier, or more
    /// than [`MAX_SCHEDULE_AHEAD`] ahead, is an error naming `deliver_at`;
    /// an `expires_at` not after the delivery time is an error naming
    /// `expires_at`.
    pub fn check_times(&mut self, now: SystemTime) -> Result<(), InvalidArgument> {
        if let Some(at) = self.deliver_at {
            // Checked: `at` is the client's, up to the largest time there is.
            if at
                .checked_add(DELIVER_AT_TOLERANCE)
                .is_some_and(|latest| latest < now)
            {
                return Err(InvalidArgument::new(
                    "deliver_at",
                    format!(
                        "is in the past (more than {} s before the server's clock)",
                        DELIVER_AT_TOLERANCE.as_secs()
                    ),
                ));
            }
            if at > now + MAX_SCHEDULE_AHEAD {
                return Err(InvalidArgument::new(
                    "deliver_at",
                    "is more than 366 days ahead",
                ));
            }
            if at <= now {
                self.deliver_at = None;
            }
        }
        if let Some(expires) = self.expires_at {
            let delivered = self.deliver_at.unwrap_or(now);
            if expires <= delivered {
                return Err(InvalidArgument::new(
                    "expires_at",
                    if self.deliver_at.is_some() {
                        "must be after deliver_at"
                    } else {
                        "must be in the future"
                    },
                ));
            }
        }
        Ok(())
    }

    /// The request this send was parsed from, as stored for a scheduled
    /// delivery: the default actor filled in, and no idempotency key or
    /// `deliver_at` (the delivery neither claims the key again nor waits).
    pub fn to_scheduled_request(&self) -> proto::SendNotificationRequest {
        let p = &self.presentation;
        let (replace_key, group_key, group_window) = match &self.fold {
            None => (String::new(), String::new(), None),
            Some(Fold::Replace(k)) => (k.clone(), String::new(), None),
            Some(Fold::Group { key, window }) => (
                String::new(),
                key.clone(),
                prost_types::Duration::try_from(*window).ok(),
            ),
        };
        proto::SendNotificationRequest {
            recipients: self
                .recipients
                .iter()
                .map(|r| r.as_str().to_owned())
                .collect(),
            r#type: self.kind.as_str().to_owned(),
            title: self.title.clone(),
            body: self.body.clone(),
            data: self.data.clone(),
            idempotency_key: String::new(),
            category: p.category.clone(),
            severity: p.severity.to_proto() as i32,
            actor: p.actor.clone(),
            action_url: p.action_url.clone(),
            actions: p.actions.iter().map(Into::into).collect(),
            replace_key,
            renotify: self.renotify,
            group_key,
            group_window,
            expires_at: self.expires_at.map(Into::into),
            deliver_at: None,
        }
    }

    /// A canonical text of everything but the idempotency key, so a retried
    /// send can be told apart from a different request reusing the key. An
    /// actor equal to `sender` counts as none, and presentation fields
    /// that are all default are left out, so a plain send's fingerprint is
    /// the one earlier versions stored (a retry across an upgrade still
    /// matches).
    pub fn fingerprint(&self, sender: &str) -> String {
        let mut presentation = self.presentation.clone();
        if presentation.actor == sender {
            presentation.actor.clear();
        }
        let mut parts = vec![
            serde_json::json!(
                self.recipients
                    .iter()
                    .map(UserId::as_str)
                    .collect::<Vec<_>>()
            ),
            serde_json::json!(self.kind.as_str()),
            serde_json::json!(self.title),
            serde_json::json!(self.body),
            serde_json::json!(self.data),
        ];
        if !presentation.is_default() || self.fold.is_some() || self.expires_at.is_some() {
            parts.push(serde_json::json!(presentation));
        }
        if let Some(expires) = self.expires_at {
            let micros = expires
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
            parts.push(serde_json::json!({"expires_at_us": micros}));
        }
        match &self.fold {
            None => {}
            Some(Fold::Replace(key)) => {
                parts.push(serde_json::json!({"replace_key": key, "renotify": self.renotify}));
            }
            Some(Fold::Group { key, window }) => parts.push(serde_json::json!({
                "group_key": key,
                "group_window_ms": window.as_millis() as u64,
                "renotify": self.renotify,
            })),
        }
        serde_json::Value::Array(parts).to_string()
    }
}

/// Parses `data`: empty means `{}`, otherwise a JSON object (RFC 8259) of at
/// most `max_bytes` bytes nested at most `max_depth` deep, returned as
/// compact JSON text.
fn parse_data(data: &str, max_bytes: usize, max_depth: usize) -> Result<String, InvalidArgument> {
    if data.is_empty() {
        return Ok("{}".to_owned());
    }
    if data.len() > max_bytes {
        return Err(InvalidArgument::new(
            "data",
            format!("is {} bytes, longer than {max_bytes}", data.len()),
        ));
    }
    match serde_json::from_str::<serde_json::Value>(data) {
        Ok(v @ serde_json::Value::Object(_)) => {
            let depth = json_depth(&v);
            if depth > max_depth {
                return Err(InvalidArgument::new(
                    "data",
                    format!("is nested {depth} levels deep, more than {max_depth}"),
                ));
            }
            Ok(v.to_string())
        }
        Ok(_) => Err(InvalidArgument::new("data", "must be a JSON object")),
        Err(e) => Err(InvalidArgument::new(
            "data",
            format!("is not valid JSON: {e}"),
        )),
    }
}

/// Nesting depth of objects and arrays in `v` (a scalar is 0), computed
/// without recursion.
fn json_depth(v: &serde_json::Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(v, 1)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &serde_json::Value>> = match v {
            serde_json::Value::Object(m) => Box::new(m.values()),
            serde_json::Value::Array(a) => Box::new(a.iter()),
            _ => continue,
        };
        deepest = deepest.max(depth);
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    deepest
}

/// What a send's recipients share: stored once (PostgreSQL `contents`)
/// and referenced by each recipient's narrow notification row, and in
/// memory shared behind an `Arc` by every recipient's event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    /// Event type.
    pub kind: String,
    /// Headline.
    pub title: String,
    /// Body text.
    pub body: String,
    /// JSON object text.
    pub data: String,
    /// Category, severity, actor and links.
    pub presentation: Presentation,
    /// When it was stored.
    pub created_at: SystemTime,
    /// The send's `replace_key`, empty when none.
    pub replace_key: String,
    /// The send's `group_key`, empty when none.
    pub group_key: String,
    /// When it expires, if it does.
    pub expires_at: Option<SystemTime>,
}

/// A notification as stored for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Deployment-wide id.
    pub id: i64,
    /// Position in the recipient's stream.
    pub seq: u64,
    /// The recipient.
    pub recipient: String,
    /// What it says, shared with the send's other recipients.
    pub content: std::sync::Arc<Content>,
    /// When it was marked read; `None` while unread (and in stream
    /// events). Current for listings.
    pub read_at: Option<SystemTime>,
    /// When it was first seen or read; `None` while neither (and in
    /// stream events). Current for listings.
    pub seen_at: Option<SystemTime>,
    /// When it was archived; `None` unless archived (and in stream
    /// events). Current for listings.
    pub archived_at: Option<SystemTime>,
    /// Its group's state, with a `group_key`.
    pub group: Option<Group>,
}

/// Which stream an event belongs to. Users' inboxes today; the enum is
/// where topic streams join (each key kind has its own seq space).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamKey {
    /// The inbox of `user` in `tenant`.
    User {
        /// The tenant.
        tenant: String,
        /// The user.
        user: String,
    },
}

impl StreamKey {
    /// The inbox of `user` in `tenant`.
    pub fn user(tenant: &str, user: &str) -> Self {
        Self::User {
            tenant: tenant.to_owned(),
            user: user.to_owned(),
        }
    }
}

/// A state change a user makes to their notifications (`herald.v1.StateAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateAction {
    /// Unread → read (and seen).
    Read,
    /// Read → unread.
    Unread,
    /// Unseen → seen.
    Seen,
    /// Out of the inbox.
    Archive,
    /// Back into the inbox.
    Unarchive,
    /// Gone for good.
    Delete,
}

impl StateAction {
    /// From the proto enum's number; unspecified or unknown is an error
    /// naming `action`.
    pub fn from_proto(value: i32) -> Result<Self, InvalidArgument> {
        use proto::StateAction as P;
        match P::try_from(value) {
            Ok(P::Read) => Ok(Self::Read),
            Ok(P::Unread) => Ok(Self::Unread),
            Ok(P::Seen) => Ok(Self::Seen),
            Ok(P::Archive) => Ok(Self::Archive),
            Ok(P::Unarchive) => Ok(Self::Unarchive),
            Ok(P::Delete) => Ok(Self::Delete),
            Ok(P::Unspecified) => Err(InvalidArgument::new("action", "is required")),
            Err(_) => Err(InvalidArgument::new(
                "action",
                format!(
                    "{value} is not a known action (1 read, 2 unread, 3 seen, 4 archive, \
                     5 unarchive, 6 delete)"
                ),
            )),
        }
    }

    /// The proto enum.
    pub fn to_proto(self) -> proto::StateAction {
        use proto::StateAction as P;
        match self {
            Self::Read => P::Read,
            Self::Unread => P::Unread,
            Self::Seen => P::Seen,
            Self::Archive => P::Archive,
            Self::Unarchive => P::Unarchive,
            Self::Delete => P::Delete,
        }
    }

    /// As stored (`state_events.action`) and carried on the bus: the proto
    /// number.
    pub fn as_i16(self) -> i16 {
        self.to_proto() as i16
    }

    /// From a stored number; `None` for one this version does not know.
    pub fn from_i16(value: i16) -> Option<Self> {
        Self::from_proto(i32::from(value)).ok()
    }
}

/// A state change on a user's stream: which notifications changed, and
/// how. Either `ids`, or every notification with seq <= `up_to_seq` that
/// `filter` matches (all when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// What happened to them.
    pub action: StateAction,
    /// Ids that changed, ascending (empty for an up-to change).
    pub ids: Vec<i64>,
    /// When non-zero, the notifications with seq <= this (that `filter`
    /// matches) changed.
    pub up_to_seq: u64,
    /// With `up_to_seq`: only the notifications it matches.
    pub filter: Option<NotificationFilter>,
}

impl StateChange {
    /// Whether v1 clients can be told of it as a `read` event
    /// (`ReadStateChanged`): a read change without a filter.
    pub fn is_plain_read(&self) -> bool {
        self.action == StateAction::Read && self.filter.is_none()
    }
}

/// What an event of a user's stream carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody {
    /// A new notification.
    Notification(Notification),
    /// Notifications changed state (read, seen, archived, deleted...).
    State(StateChange),
    /// A notification was updated in place (its id and seq, new content).
    Updated(Notification),
}

/// One event of a user's stream, at position `seq` (gap-free from 1, in
/// commit order) of history `epoch`, with its protobuf encoding computed at
/// most once.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    /// Position in the user's stream.
    pub seq: u64,
    /// The history `seq` counts in (see [`Epoch`]).
    pub epoch: Epoch,
    /// The event.
    pub body: EventBody,
    encoded: std::sync::OnceLock<bytes::Bytes>,
}

impl StreamEvent {
    /// An event; its encoding is computed on first use.
    pub fn new(seq: u64, epoch: Epoch, body: EventBody) -> Self {
        Self {
            seq,
            epoch,
            body,
            encoded: std::sync::OnceLock::new(),
        }
    }

    /// An event whose `herald.v1.Event` encoding is already known (see
    /// `wire::notification_event`).
    pub fn with_encoding(seq: u64, epoch: Epoch, body: EventBody, encoded: bytes::Bytes) -> Self {
        Self {
            seq,
            epoch,
            body,
            encoded: std::sync::OnceLock::from(encoded),
        }
    }

    /// This event as an encoded `herald.v1.Event`: encoded once, then the
    /// same bytes (reference-counted) for every stream it is sent to.
    pub fn encoded(&self) -> bytes::Bytes {
        self.encoded
            .get_or_init(|| crate::wire::encode_stream_event(self))
            .clone()
    }
}

/// Events are equal when their position and content are; whether the
/// encoding was computed yet does not matter.
impl PartialEq for StreamEvent {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq && self.epoch == other.epoch && self.body == other.body
    }
}

impl Eq for StreamEvent {}

/// What `SendNotification` stored for one recipient.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Delivery {
    /// The recipient.
    pub recipient: String,
    /// The stored notification's id.
    pub notification_id: i64,
    /// Its position in the recipient's stream: the notification's, or for
    /// an update, the update event's.
    pub seq: u64,
    /// True when it updated an existing notification.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub updated: bool,
}

/// What a store did with a send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// One per distinct recipient, in the order first named.
    pub deliveries: Vec<Delivery>,
    /// True when nothing was stored: the idempotency key was used by an
    /// earlier send, whose deliveries these are.
    pub replayed: bool,
    /// True when the send was stored for later delivery (`deliver_at`):
    /// no deliveries yet.
    pub scheduled: bool,
}

/// Which notifications a state change covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateTarget {
    /// These ids (1 to [`MAX_MARK_IDS`]), ascending, distinct.
    Ids(Vec<i64>),
    /// Every notification with seq <= this.
    UpTo(u64),
    /// Every notification the filter matches (never the all-filter).
    Filter(NotificationFilter),
}

/// Most ids in one `MarkRead` or `UpdateState`.
pub const MAX_MARK_IDS: usize = 1_000;

impl StateTarget {
    fn ids(ids: Vec<i64>) -> Result<Self, InvalidArgument> {
        let mut ids = ids;
        if ids.is_empty() {
            return Err(InvalidArgument::new("ids", "must name at least one id"));
        }
        if ids.len() > MAX_MARK_IDS {
            return Err(InvalidArgument::new(
                "ids",
                format!("names {} ids, more than {MAX_MARK_IDS}", ids.len()),
            ));
        }
        if let Some(bad) = ids.iter().find(|id| **id <= 0) {
            return Err(InvalidArgument::new(
                "ids",
                format!("{bad} is not a valid id"),
            ));
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(Self::Ids(ids))
    }

    fn up_to(seq: u64) -> Result<Self, InvalidArgument> {
        if seq == 0 {
            return Err(InvalidArgument::new("up_to_seq", "must be positive"));
        }
        Ok(Self::UpTo(seq))
    }
}

/// What `MarkRead` or `UpdateState` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRequest {
    /// The change.
    pub action: StateAction,
    /// Of which notifications.
    pub target: StateTarget,
}

impl StateRequest {
    /// Parses a `MarkRead` request: a read change by ids or up-to.
    pub fn parse_mark_read(req: proto::MarkReadRequest) -> Result<Self, InvalidArgument> {
        use proto::mark_read_request::Target;
        let target = match req.target {
            None => {
                return Err(InvalidArgument::new(
                    "target",
                    "set either ids or up_to_seq",
                ));
            }
            Some(Target::UpToSeq(seq)) => StateTarget::up_to(seq)?,
            Some(Target::Ids(ids)) => StateTarget::ids(ids.ids)?,
        };
        Ok(Self {
            action: StateAction::Read,
            target,
        })
    }

    /// Parses an `UpdateState` request; errors name `action`, `target`,
    /// `ids`, `up_to_seq` or `filter.*`.
    pub fn parse(req: proto::UpdateStateRequest) -> Result<Self, InvalidArgument> {
        use proto::update_state_request::Target;
        let action = StateAction::from_proto(req.action)?;
        let target = match req.target {
            None => {
                return Err(InvalidArgument::new(
                    "target",
                    "set one of ids, up_to_seq or filter",
                ));
            }
            Some(Target::UpToSeq(seq)) => StateTarget::up_to(seq)?,
            Some(Target::Ids(ids)) => StateTarget::ids(ids.ids)?,
            Some(Target::Filter(f)) => {
                let filter =
                    NotificationFilter::parse("filter.", &f.types, &f.categories, f.min_severity)?;
                if filter.is_all() {
                    return Err(InvalidArgument::new(
                        "filter",
                        "set at least one of types, categories or min_severity \
                         (up_to_seq covers every notification)",
                    ));
                }
                StateTarget::Filter(filter)
            }
        };
        Ok(Self { action, target })
    }
}

/// Result of `MarkRead` or `UpdateState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StateOutcome {
    /// How many notifications changed state.
    pub changed: u32,
    /// Seq of the event emitted; 0 when nothing changed.
    pub seq: u64,
}

/// Which history a stream position counts in (`herald.v1.Event.epoch`).
///
/// A `(epoch, seq)` pair names one event for as long as the store keeps the
/// history it was issued in; when the store cannot (the in-memory store
/// restarted, the database was restored or failed over), the epoch changes
/// and resuming clients get `resync` instead of a silent jump into another
/// history. The same idea as Centrifugo's `StreamPosition{Offset, Epoch}`.
/// Never 0 (0 in a request means "not given"); at most 2^53 − 1, so that
/// JavaScript numbers hold it exactly.
pub type Epoch = u64;

/// Largest epoch issued: 2^53 − 1 (`Number.MAX_SAFE_INTEGER`, ECMA-262).
pub const MAX_EPOCH: Epoch = (1 << 53) - 1;

/// A fresh random epoch in 1..=[`MAX_EPOCH`].
pub fn new_epoch() -> Epoch {
    fastrand::u64(1..=MAX_EPOCH)
}

/// A range of a stream read from the store: its events, in seq order, and
/// the epoch they count in (known even when the range is empty).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamRange {
    /// The stream's epoch when read.
    pub epoch: Epoch,
    /// The events, each of `epoch`.
    pub events: Vec<StreamEvent>,
}

/// The extent of a user's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamHead {
    /// Newest event's seq (0 when the user has none).
    pub last_seq: u64,
    /// Events with seq <= this were pruned by retention.
    pub pruned_seq: u64,
    /// The history these seqs count in.
    pub epoch: Epoch,
}

/// A page request for `ListNotifications`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageQuery {
    /// Only unread notifications.
    pub unread_only: bool,
    /// Only the notifications it matches.
    pub filter: NotificationFilter,
    /// Only notifications with seq < this (`u64::MAX` for the first page).
    pub before_seq: u64,
    /// Page size, 1 to [`MAX_PAGE_SIZE`].
    pub limit: usize,
    /// The archived notifications instead of the inbox.
    pub archived: bool,
}

/// Largest `ListNotifications` page.
pub const MAX_PAGE_SIZE: usize = 500;
/// `ListNotifications` page size when the request gives none.
pub const DEFAULT_PAGE_SIZE: usize = 50;

impl PageQuery {
    /// Parses a `ListNotifications` request. The page token is the decimal
    /// seq of the last notification of the previous page.
    pub fn parse(req: &proto::ListNotificationsRequest) -> Result<Self, InvalidArgument> {
        let limit = match req.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(InvalidArgument::new(
                    "page_size",
                    format!("{n} is more than {MAX_PAGE_SIZE}"),
                ));
            }
            n => n,
        };
        let before_seq = if req.page_token.is_empty() {
            u64::MAX
        } else {
            req.page_token
                .parse::<u64>()
                .ok()
                .filter(|s| *s > 0)
                .ok_or_else(|| {
                    InvalidArgument::new("page_token", "is not a token this server issued")
                })?
        };
        Ok(Self {
            unread_only: req.unread_only,
            filter: NotificationFilter::parse("", &req.types, &req.categories, req.min_severity)?,
            before_seq,
            limit,
            archived: req.archived,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> proto::SendNotificationRequest {
        proto::SendNotificationRequest {
            recipients: vec!["alice".into(), "bob".into(), "alice".into()],
            r#type: "project.created".into(),
            title: "hi".into(),
            body: String::new(),
            data: r#"{ "a" : 1 }"#.into(),
            ..Default::default()
        }
    }

    #[test]
    fn parse_dedups_recipients_and_compacts_data() {
        let n = NewNotification::parse(request(), &SendLimits::default()).unwrap();
        let names: Vec<_> = n.recipients.iter().map(UserId::as_str).collect();
        assert_eq!(names, ["alice", "bob"]);
        assert_eq!(n.data, r#"{"a":1}"#);
        assert_eq!(n.idempotency_key, None);
    }

    #[test]
    fn parse_names_the_bad_field() {
        type Mutation = fn(&mut proto::SendNotificationRequest);
        let cases: Vec<(Mutation, &str)> = vec![
            (|r| r.recipients.clear(), "recipients"),
            (|r| r.recipients[1] = String::new(), "recipients[1]"),
            (|r| r.r#type = String::new(), "type"),
            (|r| r.r#type = "a b".into(), "type"),
            (|r| r.r#type = "x".repeat(129), "type"),
            (|r| r.title = String::new(), "title"),
            (|r| r.body = "x".repeat(16 * 1024 + 1), "body"),
            (|r| r.data = "[1]".into(), "data"),
            (|r| r.data = "{".into(), "data"),
            (|r| r.idempotency_key = "k".repeat(200), "idempotency_key"),
            (|r| r.title = "a\0b".into(), "title"),
            (
                |r| r.data = format!("{}1{}", "[".repeat(16), "]".repeat(16)),
                "data",
            ),
            (
                |r| r.data = format!("{{\"a\":{}1{}}}", "[".repeat(16), "]".repeat(16)),
                "data",
            ),
            (|r| r.body = "\0".into(), "body"),
        ];
        for (mutate, field) in cases {
            let mut req = request();
            mutate(&mut req);
            let err = NewNotification::parse(req, &SendLimits::default()).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn fingerprint_ignores_only_the_key() {
        let a = NewNotification::parse(request(), &SendLimits::default()).unwrap();
        let mut req = request();
        req.idempotency_key = "k1".into();
        let b = NewNotification::parse(req, &SendLimits::default()).unwrap();
        assert_eq!(a.fingerprint("s"), b.fingerprint("s"));
        let mut req = request();
        req.title = "other".into();
        let c = NewNotification::parse(req, &SendLimits::default()).unwrap();
        assert_ne!(a.fingerprint("s"), c.fingerprint("s"));
        // A plain send's fingerprint is the one v1 stored.
        assert_eq!(
            a.fingerprint("s"),
            r#"[["alice","bob"],"project.created","hi","",{"a":1}]"#
                .replace(r#"{"a":1}"#, r#""{\"a\":1}""#)
        );
        // The sender as actor is no actor; another actor or a severity is
        // another request.
        let mut d = a.clone();
        d.presentation
            .default_actor(&UserId::parse("s", "s").unwrap());
        assert_eq!(a.fingerprint("s"), d.fingerprint("s"));
        d.presentation.severity = Severity::High;
        assert_ne!(a.fingerprint("s"), d.fingerprint("s"));
    }

    #[test]
    fn update_state_requests_name_the_field_at_fault() {
        use proto::update_state_request::Target;
        let req =
            |action: i32, target: Option<Target>| proto::UpdateStateRequest { action, target };
        let ok = StateRequest::parse(req(
            proto::StateAction::Archive as i32,
            Some(Target::Filter(proto::NotificationFilter {
                types: vec!["build.*".into(), "deploy".into()],
                ..Default::default()
            })),
        ))
        .unwrap();
        assert_eq!(ok.action, StateAction::Archive);
        let StateTarget::Filter(f) = &ok.target else {
            panic!("a filter target")
        };
        assert_eq!(f.to_proto().types, ["deploy", "build.*"]);
        let field = |r| StateRequest::parse(r).unwrap_err().field;
        assert_eq!(field(req(0, Some(Target::UpToSeq(3)))), "action");
        assert_eq!(field(req(99, Some(Target::UpToSeq(3)))), "action");
        assert_eq!(field(req(1, None)), "target");
        assert_eq!(field(req(1, Some(Target::UpToSeq(0)))), "up_to_seq");
        let ids = |ids: Vec<i64>| Some(Target::Ids(proto::NotificationIds { ids }));
        assert_eq!(field(req(1, ids(vec![]))), "ids");
        assert_eq!(field(req(1, ids(vec![1, -2]))), "ids");
        assert_eq!(field(req(1, ids(vec![1; MAX_MARK_IDS + 1]))), "ids");
        let filter = |f| Some(Target::Filter(f));
        assert_eq!(
            field(req(1, filter(proto::NotificationFilter::default()))),
            "filter"
        );
        assert_eq!(
            field(req(
                1,
                filter(proto::NotificationFilter {
                    categories: vec!["bad category".into()],
                    ..Default::default()
                })
            )),
            "filter.categories[0]"
        );
        assert_eq!(
            field(req(
                1,
                filter(proto::NotificationFilter {
                    min_severity: 9,
                    ..Default::default()
                })
            )),
            "filter.min_severity"
        );
    }

    #[test]
    fn read_target_and_page_query() {
        let req = proto::MarkReadRequest {
            target: Some(proto::mark_read_request::Target::Ids(
                proto::NotificationIds { ids: vec![3, 1, 3] },
            )),
        };
        let parsed = StateRequest::parse_mark_read(req).unwrap();
        assert_eq!(parsed.target, StateTarget::Ids(vec![1, 3]));
        assert_eq!(parsed.action, StateAction::Read);
        let err = StateRequest::parse_mark_read(proto::MarkReadRequest { target: None });
        assert_eq!(err.unwrap_err().field, "target");
        let bad = proto::ListNotificationsRequest {
            unread_only: false,
            page_size: 10,
            page_token: "zz".into(),
            ..Default::default()
        };
        assert_eq!(PageQuery::parse(&bad).unwrap_err().field, "page_token");
    }
}
