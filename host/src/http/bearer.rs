//! `Authorization: Bearer …` against a secret (the admin token, the API key), compared in
//! constant time.

/// What a request's `Authorization: Bearer …` says about a secret (the admin token, the
/// API key); each route family answers each case in its own shape.
#[derive(Debug, PartialEq, Eq)]
pub enum Bearer {
    Missing,
    Wrong,
    Right,
}

pub fn bearer(headers: &axum::http::HeaderMap, secret: &str) -> Bearer {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match given {
        None => Bearer::Missing,
        Some(given) if constant_time_eq(given.as_bytes(), secret.as_bytes()) => Bearer::Right,
        Some(_) => Bearer::Wrong,
    }
}

/// Compares secrets without an early exit, so response timing does not reveal them.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    #[test]
    fn bearer_check() {
        let mut headers = axum::http::HeaderMap::new();
        assert_eq!(bearer(&headers, "secret"), Bearer::Missing);
        headers.insert("authorization", "Basic secret".parse().unwrap());
        assert_eq!(bearer(&headers, "secret"), Bearer::Missing);
        headers.insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(bearer(&headers, "secret"), Bearer::Wrong);
        headers.insert("authorization", "Bearer secret".parse().unwrap());
        assert_eq!(bearer(&headers, "secret"), Bearer::Right);
    }
}
