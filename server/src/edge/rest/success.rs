//! The HTTP status of a successful REST answer, derived from the route's
//! HTTP rule and its RPC rather than written per route:
//!
//! - a `POST` of a `Create…` RPC or of `Branch` made something: 201 Created,
//!   or 202 Accepted while what it made is still being written (its
//!   `status` is "writing": the work goes on after the answer);
//! - a `DELETE` answers 204 No Content without a body, unless the client
//!   asked for the body with `Prefer: return=representation` (RFC 7240),
//!   and 404 when its answer lists nothing `deleted` (it was not there);
//! - everything else is 200.

use http::StatusCode;
use serde_json::Value;

use super::routes::Route;

/// What to answer: the status, and whether the JSON body goes with it.
pub fn answer(route: &Route, json: &Value, wants_body: bool) -> (StatusCode, bool) {
    let name = route.rpc.name();
    if route.method == http::Method::POST && (name.starts_with("Create") || name == "Branch") {
        // A create answers one record, or (CreateSandboxes) a list of them.
        let writing = json.get("status").and_then(Value::as_str) == Some("writing");
        return (if writing { StatusCode::ACCEPTED } else { StatusCode::CREATED }, true);
    }
    if route.method == http::Method::DELETE {
        if json.get("deleted").and_then(Value::as_array).is_some_and(Vec::is_empty) {
            return (StatusCode::NOT_FOUND, true);
        }
        return if wants_body { (StatusCode::OK, true) } else { (StatusCode::NO_CONTENT, false) };
    }
    (StatusCode::OK, true)
}

/// Whether a `Prefer` header asks for the representation (RFC 7240).
pub fn wants_representation(headers: &http::HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("return=representation")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::DescriptorPool;
    use serde_json::json;

    fn route(rpc: &str) -> Route {
        let pool = DescriptorPool::decode(forkd_api::FILE_DESCRIPTOR_SET).unwrap();
        let routes = super::super::routes::load(&pool, forkd_api::SERVICES).unwrap();
        routes.into_iter().find(|r| r.rpc.name() == rpc).unwrap()
    }

    #[test]
    fn statuses_follow_the_rule_and_the_rpc() {
        let ready = json!({ "status": "ready" });
        assert_eq!(answer(&route("CreateSnapshot"), &ready, false), (StatusCode::CREATED, true));
        assert_eq!(answer(&route("Branch"), &json!({ "status": "writing" }), false), (StatusCode::ACCEPTED, true));
        assert_eq!(answer(&route("CreateSandboxes"), &json!([{ "id": "sb-x" }]), false), (StatusCode::CREATED, true));
        assert_eq!(
            answer(&route("DeleteSnapshot"), &json!({ "deleted": ["a"] }), false),
            (StatusCode::NO_CONTENT, false)
        );
        assert_eq!(answer(&route("DeleteSnapshot"), &json!({ "deleted": ["a"] }), true), (StatusCode::OK, true));
        assert_eq!(answer(&route("DeleteSandbox"), &json!({ "deleted": [] }), true), (StatusCode::NOT_FOUND, true));
        assert_eq!(answer(&route("DeleteSandboxes"), &json!({ "deleted": [] }), false), (StatusCode::OK, true));
        assert_eq!(answer(&route("Exec"), &json!({}), false), (StatusCode::OK, true));
        let mut h = http::HeaderMap::new();
        assert!(!wants_representation(&h));
        h.insert("prefer", "respond-async, return=representation".parse().unwrap());
        assert!(wants_representation(&h));
    }
}
