//! Token secrets: generating them with a visible type prefix, hashing them for storage,
//! constant-time comparison, reading the bearer header. Secrets are never stored or logged
//! in clear.

use rand::RngCore;
use scabbard_common::proto::TokenKind;
use sha2::{Digest, Sha256};

/// Prefix of agent tokens (so a leaked token says what it is).
pub const AGENT_TOKEN_PREFIX: &str = "scbd_agent_";
/// Prefix of registration tokens.
pub const REGISTRATION_TOKEN_PREFIX: &str = "scbd_reg_";
/// Prefix of API tokens.
pub const API_TOKEN_PREFIX: &str = "scbd_api_";

/// The prefix of a kind of token.
pub fn prefix(kind: TokenKind) -> &'static str {
    match kind {
        TokenKind::Agent => AGENT_TOKEN_PREFIX,
        TokenKind::Registration => REGISTRATION_TOKEN_PREFIX,
        TokenKind::Api | TokenKind::Unspecified => API_TOKEN_PREFIX,
    }
}

/// A new random token of `kind` (256 bits of randomness after the prefix).
pub fn new_token(kind: TokenKind) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{}{}", prefix(kind), hex::encode(bytes))
}

/// A new random agent token.
pub fn new_agent_token() -> String {
    new_token(TokenKind::Agent)
}

/// The first characters of a token, safe to show (prefix + 4 characters).
pub fn hint(token: &str) -> String {
    let p = [
        AGENT_TOKEN_PREFIX,
        REGISTRATION_TOKEN_PREFIX,
        API_TOKEN_PREFIX,
    ]
    .into_iter()
    .find(|p| token.starts_with(p))
    .map_or(0, str::len);
    token.chars().take(p + 4).collect()
}

/// SHA-256 of a token, hex-encoded: what the store keeps.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Compares two secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Hash both first so the length does not leak either.
    let (ha, hb) = (Sha256::digest(a), Sha256::digest(b));
    ha.iter()
        .zip(hb.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Reads `authorization: Bearer <token>` from HTTP headers / gRPC metadata.
pub fn bearer_header(v: Option<&tonic::codegen::http::HeaderValue>) -> Option<&str> {
    let v = v?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Reads `authorization: Bearer <token>` from request metadata.
pub fn bearer(meta: &tonic::metadata::MetadataMap) -> Option<&str> {
    let v = meta.get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_prefixed_and_hash_stably() {
        let a = new_agent_token();
        let b = new_agent_token();
        assert_ne!(a, b);
        assert!(a.starts_with(AGENT_TOKEN_PREFIX));
        assert!(new_token(TokenKind::Api).starts_with(API_TOKEN_PREFIX));
        assert!(new_token(TokenKind::Registration).starts_with(REGISTRATION_TOKEN_PREFIX));
        assert_eq!(token_hash(&a), token_hash(&a));
        assert_ne!(token_hash(&a), token_hash(&b));
        assert_eq!(hint("scbd_api_abcdef"), "scbd_api_abcd");
        assert_eq!(hint("whatever-else"), "what");
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
