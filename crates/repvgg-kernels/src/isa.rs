//! The instruction sets the kernels are written for, detected once per process.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// An instruction set the kernels have code for. Ordered: a machine that runs one runs every
/// set before it, so a cap ([`Isa::capped`]) is a minimum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust that the compiler vectorises for the build's baseline target.
    Portable,
    /// AVX2 with FMA (x86-64, 256-bit vectors).
    Avx2,
    /// AVX-512 Foundation (x86-64, 512-bit vectors), with AVX2 and FMA.
    Avx512,
}

/// An instruction set asked for that this machine lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "instruction set {requested} is not available on this machine (it has: {})",
    Isa::available_names()
)]
pub struct UnavailableIsa {
    pub requested: Isa,
}

/// A name that is not an instruction set.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown instruction set '{0}': expected portable, avx2 or avx512")]
pub struct UnknownIsa(pub String);

impl Isa {
    /// Every set, in order.
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    /// The most capable set this machine runs, detected on first use.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(detect)
    }

    /// Every set this machine runs, portable first: what tests iterate over so that each
    /// kernel set is exercised end to end wherever they run.
    pub fn available() -> Vec<Isa> {
        Isa::ALL
            .into_iter()
            .filter(|isa| isa.is_available())
            .collect()
    }

    pub fn is_available(self) -> bool {
        self <= Isa::best()
    }

    /// The set to run: `cap` if given (an error if the machine lacks it), else the best.
    pub fn capped(cap: Option<Isa>) -> Result<Isa, UnavailableIsa> {
        match cap {
            None => Ok(Isa::best()),
            Some(isa) if isa.is_available() => Ok(isa),
            Some(requested) => Err(UnavailableIsa { requested }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    fn available_names() -> String {
        let names: Vec<&str> = Isa::available().into_iter().map(Isa::name).collect();
        names.join(", ")
    }

    /// Panics unless this machine runs `self`: the entry points of the kernels call it once
    /// per call, so that a safe function given a set the machine lacks stops instead of
    /// executing instructions the processor does not have.
    pub(crate) fn assert_available(self) {
        assert!(
            self.is_available(),
            "{}",
            UnavailableIsa { requested: self }
        );
    }
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Isa {
    type Err = UnknownIsa;

    fn from_str(s: &str) -> Result<Isa, UnknownIsa> {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownIsa(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_caps_are_checked() {
        for isa in Isa::ALL {
            assert_eq!(isa.name().parse::<Isa>(), Ok(isa));
        }
        assert!("sse9".parse::<Isa>().is_err());
        let available = Isa::available();
        assert_eq!(available[0], Isa::Portable);
        assert_eq!(*available.last().unwrap(), Isa::best());
        assert_eq!(Isa::capped(None), Ok(Isa::best()));
        for isa in Isa::ALL {
            assert_eq!(Isa::capped(Some(isa)).is_ok(), available.contains(&isa));
        }
    }
}
