//! The fuzz targets, one module each, and the list the engines run.
//!
//! Every target takes any bytes, reads its structured input out of them ([`crate::input`]) and
//! panics when a property breaks; returning means the input passed.

pub mod config;
pub mod error_body;
pub mod headers;
pub mod json_body;
pub mod multipart;
pub mod usage;

/// One fuzz target.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Its name: the seed directory `seeds/<name>/` and the `make fuzz` target.
    pub name: &'static str,
    /// Checks one input; panics when a property breaks.
    pub run: fn(&[u8]),
}

/// Every target, in the order `make fuzz` runs them.
pub const ALL: &[Target] = &[
    Target {
        name: "config",
        run: config::run,
    },
    Target {
        name: "headers",
        run: headers::run,
    },
    Target {
        name: "json_body",
        run: json_body::run,
    },
    Target {
        name: "multipart",
        run: multipart::run,
    },
    Target {
        name: "usage",
        run: usage::run,
    },
    Target {
        name: "error_body",
        run: error_body::run,
    },
];

/// The target called `name`.
pub fn by_name(name: &str) -> Option<&'static Target> {
    ALL.iter().find(|t| t.name == name)
}

/// The most a call may allocate at once for an input of `len` bytes: `base` plus `per_byte`
/// times the input. Targets pick the factors; the point is that nothing grows without bound.
pub(crate) fn memory_bound(base: usize, per_byte: usize, len: usize) -> usize {
    base.saturating_add(per_byte.saturating_mul(len))
}
