//! [`ShardSpec`]: the one parser of the shard rules users type (`replicate:N`, `dimK:N`,
//! `tp:N`), shared by the CLI (`--shard`, `--tp-rule`), Python (`shard=`, `tp_rules=`) and the
//! C ABI (`gantry_split` and a destination count), so the three accept and refuse the same
//! text with the same messages.
//!
//! Trust rules: a count a user types decides how much is allocated (one buffer, one share list
//! and one copy list per destination), so it is bounded before anything is built: at most
//! [`DESTINATIONS_MAX`] destinations, and [`check_destinations`] is called again by
//! [`super::Layout::new`] so that callers that build their own placement are bounded too.
//! Whether that many GPUs exist is checked where GPUs are opened. Text quoted in an error is
//! escaped, so a message stays one line whatever was typed.
//!
//! `dimK:N` splits every tensor of two or more dimensions along dimension `K` where `N`
//! divides it, and places vectors whole; a tensor of two or more dimensions that has no
//! dimension `K` is an error naming it (a typo such as `dim5:2` on a model of matrices would
//! otherwise copy the whole model to every destination without a word).

use std::fmt;
use std::str::FromStr;

use gantry_format::{escape, TensorEntry};

use super::tp::{tensor_parallel, Split};
use super::{split, Share};
use crate::error::{Error, Result};

/// The most destinations of one placed load (host buffers, GPUs, or the ranks of a cooperative
/// load): more than any host holds GPUs, and low enough that the per-destination bookkeeping
/// of a rule stays small.
pub const DESTINATIONS_MAX: usize = 1024;

/// An error unless `count` destinations are 1 to [`DESTINATIONS_MAX`]; `what` names the value
/// in the message (an option, a parameter).
pub fn check_destinations(what: &str, count: usize) -> Result<()> {
    if (1..=DESTINATIONS_MAX).contains(&count) {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{what}: {count} destinations; a placed load takes 1 to {DESTINATIONS_MAX}"
    )))
}

/// How a [`ShardSpec`] places each tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardRule {
    /// Every tensor whole to every destination (`replicate:N`).
    Replicate,
    /// Tensors of two or more dimensions split evenly along this dimension where it divides,
    /// vectors whole (`dimK:N`).
    Dim(usize),
    /// The tensor-parallel rule by tensor name (`tp:N`, see [`super::TensorParallel`]).
    TensorParallel,
}

/// A shard rule over a number of destinations, parsed from `replicate:N`, `dimK:N` or `tp:N`.
///
/// ```
/// use gantry::placement::{ShardRule, ShardSpec};
/// let spec: ShardSpec = "tp:4".parse()?;
/// assert_eq!((spec.rule, spec.parts), (ShardRule::TensorParallel, 4));
/// assert!("replicate:1000000000".parse::<ShardSpec>().is_err());
/// # Ok::<(), gantry::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSpec {
    /// How tensors are placed.
    pub rule: ShardRule,
    /// Destinations: 1 to [`DESTINATIONS_MAX`].
    pub parts: usize,
}

/// A placement built from a [`ShardSpec`]: for a tensor, which destinations get what of it.
pub type Placement = Box<dyn Fn(&TensorEntry) -> Result<Vec<(usize, Share)>> + Send + Sync>;

/// `text` as a decimal number made of ASCII digits only (no sign, no spaces).
fn digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl FromStr for ShardSpec {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::Config(format!(
                "shard '{}': {why} (expected replicate:N, dimK:N or tp:N, N from 1 to {DESTINATIONS_MAX})",
                escape(text)
            ))
        };
        let (kind, count) = text.split_once(':').ok_or_else(|| bad("no ':N'"))?;
        let rule = match kind {
            "replicate" => ShardRule::Replicate,
            "tp" => ShardRule::TensorParallel,
            _ => match kind.strip_prefix("dim").map(digits) {
                Some(Some(k)) => {
                    ShardRule::Dim(usize::try_from(k).map_err(|_| bad("no such dimension"))?)
                }
                Some(None) => return Err(bad("K of dimK is not a dimension number")),
                None => return Err(bad("unknown rule")),
            },
        };
        let parts = digits(count).ok_or_else(|| bad("N is not a number"))?;
        if parts == 0 || parts > DESTINATIONS_MAX as u64 {
            return Err(bad(&format!("N is {parts}")));
        }
        Ok(ShardSpec { rule, parts: parts as usize })
    }
}

impl fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rule {
            ShardRule::Replicate => write!(f, "replicate:{}", self.parts),
            ShardRule::Dim(k) => write!(f, "dim{k}:{}", self.parts),
            ShardRule::TensorParallel => write!(f, "tp:{}", self.parts),
        }
    }
}

/// One `PATTERN=SPLIT` tensor-parallel pattern (`--tp-rule`): the pattern and its split
/// (`column`, `row`, `replicate` or `dimK`).
pub fn parse_tp_rule(text: &str) -> Result<(String, Split)> {
    let (pattern, split) = text.rsplit_once('=').ok_or_else(|| {
        Error::Config(format!(
            "tp rule '{}': expected PATTERN=column|row|replicate|dimK",
            escape(text)
        ))
    })?;
    Ok((pattern.to_owned(), split.parse()?))
}

impl ShardSpec {
    /// The spec over `parts` destinations (checked as parsing checks it).
    pub fn new(rule: ShardRule, parts: usize) -> Result<Self> {
        check_destinations("shard", parts)?;
        Ok(ShardSpec { rule, parts })
    }

    /// The placement of this spec; `tp_rules` (patterns ahead of the built-in ones, first
    /// wins) only go with `tp:N`.
    pub fn placement(&self, tp_rules: &[(String, Split)]) -> Result<Placement> {
        check_destinations("shard", self.parts)?;
        let parts = self.parts;
        if !tp_rules.is_empty() && self.rule != ShardRule::TensorParallel {
            return Err(Error::Config(format!(
                "shard {self}: tensor-parallel patterns (--tp-rule, tp_rules) go with tp:N"
            )));
        }
        Ok(match self.rule {
            ShardRule::Replicate => Box::new(move |t| split(t, None, parts)),
            ShardRule::Dim(k) => Box::new(move |t| {
                if t.shape.len() >= 2 && t.shape.len() <= k {
                    return Err(Error::placement(
                        t,
                        format!("shard dim{k}:{parts}: it has no dimension {k}"),
                    ));
                }
                split(t, Some(k), parts)
            }),
            ShardRule::TensorParallel => {
                let tp = tp_rules
                    .iter()
                    .rev()
                    .fold(tensor_parallel(parts), |tp, (p, s)| tp.with_rule(p, *s));
                Box::new(move |t| tp.place(t))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_format::{Dtype, FileId};

    fn entry(name: &str, shape: &[u64]) -> TensorEntry {
        let len = shape.iter().product::<u64>() * 2;
        let shape = shape.to_vec();
        TensorEntry {
            name: name.into(),
            dtype: Dtype::BF16,
            shape,
            file: FileId(0),
            offset: 0,
            len,
        }
    }

    #[test]
    fn parses_and_bounds() {
        let ok = |s: &str| s.parse::<ShardSpec>().unwrap();
        assert_eq!(ok("replicate:3"), ShardSpec { rule: ShardRule::Replicate, parts: 3 });
        assert_eq!(ok("dim1:2"), ShardSpec { rule: ShardRule::Dim(1), parts: 2 });
        assert_eq!(ok("tp:1024"), ShardSpec { rule: ShardRule::TensorParallel, parts: 1024 });
        for text in [
            "replicate:1000000000",
            "tp:18446744073709551615",
            "dim0:18446744073709551616",
            "tp:1025",
            "tp:0",
            "tp:+2",
            "tp: 2",
            "dim-1:2",
            "dim:2",
            "tp",
            "",
            "sideways:2",
            "tp:2\nerror: fake",
        ] {
            let e = text.parse::<ShardSpec>().unwrap_err().to_string();
            assert!(e.contains("expected replicate:N") && !e.contains('\n'), "{text:?}: {e}");
        }
        assert_eq!(ok("dim2:4").to_string(), "dim2:4");
        assert!(check_destinations("x", 10_000_000).is_err());
        // A dimension past any tensor's parses, and fails on the first matrix, naming it.
        let place = ok_placement("dim18446744073709551615:2");
        assert!(place(&entry("m", &[2, 2])).unwrap_err().to_string().contains("'m'"));
    }

    #[test]
    fn a_missing_dimension_names_the_tensor() {
        let place = ok_placement("dim5:2");
        let e = place(&entry("model.w", &[4, 6])).unwrap_err().to_string();
        assert!(e.contains("model.w") && e.contains("no dimension 5"), "{e}");
        // Vectors go whole; a dimension that does not divide goes whole (as documented).
        assert_eq!(
            place(&entry("norm", &[4])).unwrap(),
            vec![(0, Share::Whole), (1, Share::Whole)]
        );
        let place = ok_placement("dim1:4");
        assert_eq!(place(&entry("w", &[4, 6])).unwrap().len(), 4);
        assert!(matches!(place(&entry("w", &[4, 8])).unwrap()[3].1, Share::Slice(_)));
    }

    #[test]
    fn tp_rules_go_with_tp_only() {
        let rules = vec![parse_tp_rule("*.mine=row").unwrap()];
        let spec: ShardSpec = "replicate:2".parse().unwrap();
        assert!(spec.placement(&rules).is_err());
        let tp: ShardSpec = "tp:2".parse().unwrap();
        let place = tp.placement(&rules).unwrap();
        let shares = place(&entry("a.mine", &[4, 6])).unwrap();
        assert!(matches!(shares[1].1, Share::Slice(s) if s.dim == 1));
        assert!(parse_tp_rule("no-equals").is_err());
        assert!(parse_tp_rule("*=sideways").is_err());
    }

    fn ok_placement(text: &str) -> Placement {
        text.parse::<ShardSpec>().unwrap().placement(&[]).unwrap()
    }
}
