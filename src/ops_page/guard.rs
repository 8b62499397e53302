//! What keeps the page safe in a browser: the response headers every answer carries (a strict
//! Content-Security-Policy, no sniffing, no referrer, no framing, no caching) and the checks a form post
//! must pass (same origin by `Sec-Fetch-Site` and `Origin`, and a CSRF token).
//!
//! The CSRF token is an HMAC, under a key this process draws at start, of a random nonce the page sets as
//! an `HttpOnly; SameSite=Strict` cookie: a post must carry the cookie and the token that matches it. A
//! foreign site can neither read the token nor set a cookie whose HMAC it could forge, and a restart
//! (a new key) voids every token, so a stale form is refused rather than trusted.

use axum::http::{HeaderMap, HeaderValue, header};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The policy: nothing but the page's own stylesheet and its own forms; no script at all.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

/// The cookie holding the CSRF nonce.
pub const CSRF_COOKIE: &str = "meshline_csrf";

/// Adds the security headers to every answer.
pub fn secure_headers(headers: &mut HeaderMap) {
    let set = |h: &mut HeaderMap, name: header::HeaderName, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    set(
        headers,
        header::CONTENT_SECURITY_POLICY,
        CONTENT_SECURITY_POLICY,
    );
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::REFERRER_POLICY, "no-referrer");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    // Held records' context is PII-redacted, but still nothing a shared proxy or the browser should keep.
    set(headers, header::CACHE_CONTROL, "no-store");
}

/// The per-process key the CSRF tokens are made with.
#[derive(Clone)]
pub struct CsrfKey([u8; 32]);

impl CsrfKey {
    pub fn random() -> CsrfKey {
        CsrfKey(rand::random())
    }

    /// The token for a nonce.
    pub fn token(&self, nonce: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(nonce.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `token` is this key's token for `nonce` (compared in constant time).
    pub fn verify(&self, nonce: &str, token: &str) -> bool {
        let Ok(given) = hex::decode(token) else {
            return false;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(nonce.as_bytes());
        mac.verify_slice(&given).is_ok()
    }
}

/// A fresh nonce for the CSRF cookie.
pub fn new_nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// The CSRF nonce the request's cookie carries, if it carries a well-formed one.
pub fn cookie_nonce(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == CSRF_COOKIE)
        .map(|(_, v)| v.to_string())
        .filter(|v| v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `Set-Cookie` value for a nonce. Not `Secure`: the page is also reached over plain
/// `kubectl port-forward` on localhost; `SameSite=Strict` is what keeps it off cross-site requests.
pub fn nonce_cookie(nonce: &str) -> String {
    format!("{CSRF_COOKIE}={nonce}; Path=/; HttpOnly; SameSite=Strict")
}

/// Refuses a post that a browser says came from another site, or whose `Origin` is not this page's host.
/// Returns why, for the 403 page.
pub fn same_origin(headers: &HeaderMap) -> Result<(), String> {
    let site = headers.get("sec-fetch-site");
    if let Some(site) = site
        && site.as_bytes() != b"same-origin"
    {
        return Err(format!(
            "this form was posted from another site (Sec-Fetch-Site: {}); post it from this page",
            String::from_utf8_lossy(site.as_bytes())
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        // Under `Referrer-Policy: no-referrer` Chromium sends `Origin: null` even on the page's own form
        // posts; the browser's own `Sec-Fetch-Site: same-origin` (no page can set it) vouches for those.
        // An opaque origin elsewhere (a sandboxed frame) says `cross-site` and was refused above.
        if origin == "null" && site.is_some() {
            return Ok(());
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if host.is_empty() || authority != Some(host) {
            return Err(format!(
                "this form was posted from origin {origin:?}, not from this page ({host:?})"
            ));
        }
    }
    Ok(())
}

/// The whole check of a form post: same origin, and a CSRF token matching the cookie's nonce.
pub fn check_post(key: &CsrfKey, headers: &HeaderMap, token: &str) -> Result<(), String> {
    same_origin(headers)?;
    let Some(nonce) = cookie_nonce(headers) else {
        return Err(
            "the form's CSRF cookie is missing: load the page again and post from it".into(),
        );
    };
    if !key.verify(&nonce, token) {
        return Err(
            "the form's CSRF token does not match (a stale page, or a post from elsewhere): load \
             the page again"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_token_verifies_only_for_its_nonce_and_its_process_key() {
        let key = CsrfKey::random();
        let nonce = new_nonce();
        let token = key.token(&nonce);
        assert!(key.verify(&nonce, &token));
        assert!(!key.verify(&new_nonce(), &token));
        assert!(!CsrfKey::random().verify(&nonce, &token));
        assert!(!key.verify(&nonce, "not hex"));
        assert!(!key.verify(&nonce, ""));
    }

    #[test]
    fn a_post_from_this_page_passes_and_a_foreign_or_forged_one_is_refused() {
        let key = CsrfKey::random();
        let nonce = new_nonce();
        let token = key.token(&nonce);
        let cookie = format!("other=1; {CSRF_COOKIE}={nonce}");
        let own = headers(&[
            ("host", "localhost:8090"),
            ("origin", "http://localhost:8090"),
            ("sec-fetch-site", "same-origin"),
            ("cookie", &cookie),
        ]);
        assert_eq!(check_post(&key, &own, &token), Ok(()));
        let foreign_origin = headers(&[
            ("host", "localhost:8090"),
            ("origin", "https://evil.example"),
            ("cookie", &cookie),
        ]);
        assert!(
            check_post(&key, &foreign_origin, &token)
                .unwrap_err()
                .contains("evil.example")
        );
        let cross_site = headers(&[("sec-fetch-site", "cross-site"), ("cookie", &cookie)]);
        assert!(
            check_post(&key, &cross_site, &token)
                .unwrap_err()
                .contains("cross-site")
        );
        let null_origin = headers(&[
            ("host", "localhost:8090"),
            ("origin", "null"),
            ("cookie", &cookie),
        ]);
        assert!(check_post(&key, &null_origin, &token).is_err());
        let null_same_site = headers(&[
            ("host", "localhost:8090"),
            ("origin", "null"),
            ("sec-fetch-site", "same-origin"),
            ("cookie", &cookie),
        ]);
        assert_eq!(check_post(&key, &null_same_site, &token), Ok(()));
        let no_cookie = headers(&[("host", "localhost:8090")]);
        assert!(
            check_post(&key, &no_cookie, &token)
                .unwrap_err()
                .contains("cookie")
        );
        assert!(
            check_post(&key, &own, "")
                .unwrap_err()
                .contains("CSRF token")
        );
    }
}
