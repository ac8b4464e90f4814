//! Equality of short byte strings, inline.
//!
//! An ACT decision compares a handful of ids, each a few bytes long (user,
//! device, kind, provider). `==` on slices of unknown length is a call to
//! libc's `memcmp`, whose dispatch costs more than the comparison itself at
//! these lengths: it was 15 % of a share decision. Two overlapping loads of
//! one word each cover every length from 4 to 32 bytes without a loop.

#[inline]
pub fn same(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        0..=3 => a.iter().zip(b).all(|(x, y)| x == y),
        4..=7 => word::<4>(a, b, 0) && word::<4>(a, b, n - 4),
        8..=15 => word::<8>(a, b, 0) && word::<8>(a, b, n - 8),
        16..=32 => word::<16>(a, b, 0) && word::<16>(a, b, n - 16),
        _ => a == b,
    }
}

/// Do `a` and `b` agree on the `W` bytes from `at`?
#[inline(always)]
fn word<const W: usize>(a: &[u8], b: &[u8], at: usize) -> bool {
    let load = |s: &[u8]| -> [u8; W] { s[at..at + W].try_into().expect("W bytes") };
    load(a) == load(b)
}

/// `s` without `prefix`, if it starts with it.
#[inline]
pub fn strip_prefix<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.as_bytes().get(..prefix.len())?;
    // Both are `str`s and `prefix` is whole, so a match ends on a boundary.
    same(head, prefix.as_bytes()).then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_slice_equality_at_every_length_and_position() {
        let base: Vec<u8> = (0..40u8).map(|i| b'a' + i % 26).collect();
        for n in 0..=40 {
            let a = &base[..n];
            assert!(same(a, a), "n={n}");
            if n > 0 {
                assert!(!same(a, &base[..n - 1]), "lengths {n} and {}", n - 1);
            }
            for i in 0..n {
                let mut b = a.to_vec();
                b[i] ^= 0x20;
                assert!(!same(a, &b), "n={n}, differs at {i}");
                assert_eq!(same(a, &b), a == &b[..]);
            }
        }
        assert!(!same(b"abc", b"abcd"));
        assert!(same(b"", b""));
    }

    #[test]
    fn strip_prefix_like_str() {
        for (s, p) in [
            ("pii/u/d/k", "pii/"),
            ("pii", "pii/"),
            ("consentry/notices/p1", "consentry/notices/"),
            ("consentry/notice/p1", "consentry/notices/"),
            ("é/x", "é/"),
            ("", ""),
        ] {
            assert_eq!(strip_prefix(s, p), s.strip_prefix(p), "{s:?} {p:?}");
        }
    }
}
