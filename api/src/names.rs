//! Validated names. Every string that becomes part of a host path or a
//! database key passes through one of these types first, so an unchecked
//! string never reaches the filesystem.

use std::fmt;

/// Why a name was refused. `field` names the request field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {value:?}: {reason}")]
pub struct NameError {
    pub field: &'static str,
    pub value: String,
    pub reason: &'static str,
}

fn too_long(value: &str) -> String {
    // Never echo an enormous value back in an error message.
    if value.len() > 80 {
        let mut cut = 80;
        while !value.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &value[..cut])
    } else {
        value.to_string()
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:literal, $check:path) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        /// Debug-formats as the quoted name, the way a `String` would, so
        /// messages read `snapshot "py"`.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl $name {
            /// Validates `value`; the error names the request field.
            pub fn parse(value: &str) -> Result<Self, NameError> {
                Self::parse_field(value, $field)
            }

            /// Validates `value`, naming `field` in the error.
            pub fn parse_field(value: &str, field: &'static str) -> Result<Self, NameError> {
                $check(value).map_err(|reason| NameError {
                    field,
                    value: too_long(value),
                    reason,
                })?;
                Ok(Self(value.to_string()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        /// Validated on the way in: a stored record with a name that is not
        /// one (a damaged or edited state store) fails to load.
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

name_type!(
    /// A snapshot tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,63}`, never `.` or `..`.
    Tag,
    "tag",
    check_tag
);

name_type!(
    /// A sandbox id: `sb-` followed by 1–40 of `[a-z0-9]`.
    SandboxId,
    "id",
    check_sandbox_id
);

name_type!(
    /// A workspace name: `[A-Za-z0-9_-]{1,64}`.
    WorkspaceName,
    "name",
    check_workspace_name
);

/// Longest tag.
pub const TAG_MAX: usize = 64;

fn check_tag(v: &str) -> Result<(), &'static str> {
    let bytes = v.as_bytes();
    if bytes.is_empty() {
        return Err("must not be empty");
    }
    if bytes.len() > TAG_MAX {
        return Err("longer than 64 characters");
    }
    if v == "." || v == ".." {
        return Err("'.' and '..' are not tags");
    }
    let first_ok = bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_';
    if !first_ok {
        return Err("must start with a letter, digit or '_'");
    }
    if !bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return Err("may only contain letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

fn check_sandbox_id(v: &str) -> Result<(), &'static str> {
    let Some(rest) = v.strip_prefix("sb-") else {
        return Err("must start with 'sb-'");
    };
    if rest.is_empty() || rest.len() > 40 {
        return Err("must have 1 to 40 characters after 'sb-'");
    }
    if !rest.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        return Err("may only contain lowercase letters and digits after 'sb-'");
    }
    Ok(())
}

fn check_workspace_name(v: &str) -> Result<(), &'static str> {
    if v.is_empty() || v.len() > 64 {
        return Err("must have 1 to 64 characters");
    }
    if !v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')) {
        return Err("may only contain letters, digits, '_' and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        for ok in ["a", "_x", "py-3.11_base", "A9", &"t".repeat(64)] {
            assert!(Tag::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "../etc", "a/b", ".hidden", "-x", "a b", &"t".repeat(65), "é"] {
            let err = Tag::parse(bad).unwrap_err();
            assert_eq!(err.field, "tag", "{bad}");
        }
    }

    #[test]
    fn sandbox_ids() {
        assert!(SandboxId::parse("sb-0a1b2c").is_ok());
        for bad in ["", "sb-", "sb-ABC", "xx-123", "sb-../x", &format!("sb-{}", "a".repeat(41))] {
            assert!(SandboxId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn workspace_names() {
        assert!(WorkspaceName::parse("my_ws-1").is_ok());
        for bad in ["", "a.b", "a/b", "..", &"w".repeat(65)] {
            assert!(WorkspaceName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn long_values_are_cut_in_errors() {
        let err = Tag::parse(&"x".repeat(5000)).unwrap_err();
        assert!(err.value.len() < 100);
    }
}

#[cfg(test)]
mod serde_tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_checked_when_read() {
        let t = Tag::parse("py-1").unwrap();
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"py-1\"");
        assert_eq!(serde_json::from_str::<Tag>("\"py-1\"").unwrap(), t);
        assert!(serde_json::from_str::<Tag>("\"..\"").is_err());
        assert!(serde_json::from_str::<SandboxId>("\"../../etc\"").is_err());
        assert_eq!(format!("{t:?}"), "\"py-1\"");
    }
}
