//! Property tests of the name validators: whatever a client sends, an
//! accepted tag, sandbox id or workspace name is one plain path component.

use forkd_api::names::{SandboxId, Tag, WorkspaceName};
use proptest::prelude::*;

/// Strings rich in the characters that matter for paths.
fn nasty() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9._/\\\\\\-\0 %]{0,80}",
        "sb-[a-z0-9./\0]{0,45}",
        Just("..".to_string()),
        Just(".".to_string()),
        Just("sb-..".to_string()),
    ]
}

fn plain_component(s: &str) {
    assert!(!s.is_empty());
    assert!(!s.contains('/'), "{s:?} contains /");
    assert!(!s.contains('\\'), "{s:?} contains \\");
    assert!(!s.contains('\0'), "{s:?} contains NUL");
    assert!(s != "." && s != "..", "{s:?} is a dot entry");
    assert!(s.len() <= 64, "{s:?} too long");
    let p = std::path::Path::new(s);
    assert_eq!(p.components().count(), 1, "{s:?}");
    assert!(matches!(p.components().next(), Some(std::path::Component::Normal(_))), "{s:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn accepted_tags_are_plain_components(s in nasty()) {
        if let Ok(t) = Tag::parse(&s) {
            plain_component(t.as_str());
            prop_assert_eq!(t.as_str(), s.as_str());
        }
    }

    #[test]
    fn accepted_sandbox_ids_are_plain_components(s in nasty()) {
        if let Ok(id) = SandboxId::parse(&s) {
            plain_component(id.as_str());
            prop_assert!(id.as_str().starts_with("sb-"));
        }
    }

    #[test]
    fn accepted_workspace_names_are_plain_components(s in nasty()) {
        if let Ok(n) = WorkspaceName::parse(&s) {
            plain_component(n.as_str());
        }
    }

    #[test]
    fn errors_name_the_field_and_stay_short(s in nasty()) {
        if let Err(e) = Tag::parse_field(&s, "snapshot_tag") {
            prop_assert_eq!(e.field, "snapshot_tag");
            prop_assert!(e.to_string().len() < 400);
        }
    }

    #[test]
    fn valid_shapes_are_accepted(t in "[A-Za-z0-9_][A-Za-z0-9._-]{0,63}", id in "sb-[a-z0-9]{1,40}") {
        if t != "." && t != ".." {
            prop_assert!(Tag::parse(&t).is_ok(), "{}", t);
        }
        prop_assert!(SandboxId::parse(&id).is_ok());
    }
}
