//! The companion's label types, shared by the code that decides and the
//! metrics that count: why an admission decision came out as it did
//! ([`super::admission`]), and why a node-list fetch ran ([`super::sync`]).

/// Why a decision came out as it did (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Known to headscale, not expired, allowed by the lists.
    Known,
    /// Not in the cache.
    Unknown,
    /// Known but its key expired.
    Expired,
    /// Known but neither its user nor a tag is on the allow-lists.
    NotAllowed,
    /// Nothing was ever synced; `--admission-when-empty` decided.
    CacheEmpty,
    /// The verify URL said `{"Allow":true}`.
    UrlAllow,
    /// The verify URL said `{"Allow":false}`.
    UrlDeny,
    /// The verify URL answered a status other than 200.
    UrlStatus,
    /// The verify URL's body was not `{"Allow":bool}`.
    UrlDecode,
    /// The verify URL was unreachable or timed out (fail-open decides).
    UrlUnreachable,
    /// A cached verify-URL decision.
    UrlCached,
}

impl Reason {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Known => "known",
            Reason::Unknown => "unknown",
            Reason::Expired => "expired",
            Reason::NotAllowed => "not_allowed",
            Reason::CacheEmpty => "cache_empty",
            Reason::UrlAllow => "url_allow",
            Reason::UrlDeny => "url_deny",
            Reason::UrlStatus => "url_status",
            Reason::UrlDecode => "url_decode",
            Reason::UrlUnreachable => "url_unreachable",
            Reason::UrlCached => "url_cached",
        }
    }
}

/// Why a node-list fetch ran (the `cause` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncCause {
    /// The poll interval came round.
    Poll,
    /// Admission met a key the cache did not know.
    Miss,
}

impl SyncCause {
    /// Every cause, for pre-registering the metric.
    pub const ALL: [SyncCause; 2] = [SyncCause::Poll, SyncCause::Miss];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            SyncCause::Poll => "poll",
            SyncCause::Miss => "miss",
        }
    }
}
