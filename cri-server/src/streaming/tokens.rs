//! Single-use, expiring tokens that map a streaming URL back to the CRI request that made it.
//!
//! Like kubelet's `requestCache`: a token is random, lives for a TTL (1 minute by default), is
//! removed on first use, and the cache holds a bounded number of in-flight entries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_cri::v1::{AttachRequest, ExecRequest, PortForwardRequest};

/// Source of "now" for token expiry; tests inject a manual clock.
pub trait Clock: Send + Sync + 'static {
    /// Current instant.
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Why a token could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Too many unexpired tokens are outstanding.
    #[error("maximum number of in-flight streaming requests ({0}) exceeded")]
    CacheFull(usize),
    /// The OS random source failed.
    #[error("cannot generate a streaming token: {0}")]
    Random(String),
}

/// The request a token stands for.
#[derive(Debug, Clone)]
pub enum CachedRequest {
    /// `Exec` streaming request.
    Exec(ExecRequest),
    /// `Attach` streaming request.
    Attach(AttachRequest),
    /// `PortForward` streaming request.
    PortForward(PortForwardRequest),
}

/// Token → request map with expiry and a size bound.
pub struct RequestCache {
    clock: Arc<dyn Clock>,
    ttl: Duration,
    max: usize,
    entries: Mutex<HashMap<String, (Instant, CachedRequest)>>,
}

impl RequestCache {
    /// A cache whose tokens live `ttl` and of which at most `max` are outstanding.
    pub fn new(clock: Arc<dyn Clock>, ttl: Duration, max: usize) -> Self {
        RequestCache {
            clock,
            ttl,
            max,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Stores `req` under a fresh random token and returns the token (URL-safe base64).
    pub fn insert(&self, req: CachedRequest) -> Result<String, TokenError> {
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).map_err(|e| TokenError::Random(e.to_string()))?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let now = self.clock.now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.max {
            entries.retain(|_, (expires, _)| *expires > now);
        }
        if entries.len() >= self.max {
            return Err(TokenError::CacheFull(self.max));
        }
        entries.insert(token.clone(), (now + self.ttl, req));
        Ok(token)
    }

    /// Removes the token and returns its request if it had not expired.
    pub fn consume(&self, token: &str) -> Option<CachedRequest> {
        let now = self.clock.now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (expires, req) = entries.remove(token)?;
        (expires > now).then_some(req)
    }

    /// Number of stored (possibly expired) tokens.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }
}

/// A clock tests move by hand.
#[cfg(test)]
pub struct ManualClock(Mutex<Instant>);

#[cfg(test)]
impl ManualClock {
    /// Starts at the current instant.
    pub fn new() -> Self {
        ManualClock(Mutex::new(Instant::now()))
    }
    /// Moves the clock forward.
    pub fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec() -> CachedRequest {
        CachedRequest::Exec(ExecRequest {
            container_id: "c".into(),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })
    }

    #[test]
    fn single_use_and_expiry() {
        let clock = Arc::new(ManualClock::new());
        let cache = RequestCache::new(clock.clone(), Duration::from_secs(60), 10);
        let t1 = cache.insert(exec()).unwrap();
        let t2 = cache.insert(exec()).unwrap();
        assert_ne!(t1, t2);
        assert_eq!(t1.len(), 22);
        assert!(cache.consume(&t1).is_some());
        assert!(cache.consume(&t1).is_none(), "tokens are single use");
        clock.advance(Duration::from_secs(61));
        assert!(cache.consume(&t2).is_none(), "expired after the TTL");
        assert!(cache.consume("nope").is_none());
    }

    #[test]
    fn bounded_and_evicts_expired_first() {
        let clock = Arc::new(ManualClock::new());
        let cache = RequestCache::new(clock.clone(), Duration::from_secs(60), 3);
        for _ in 0..3 {
            cache.insert(exec()).unwrap();
        }
        assert!(matches!(
            cache.insert(exec()),
            Err(TokenError::CacheFull(3))
        ));
        clock.advance(Duration::from_secs(61));
        cache.insert(exec()).unwrap();
        assert_eq!(cache.len(), 1);
    }
}
