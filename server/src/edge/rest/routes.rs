//! REST routes derived from the `google.api.http` annotations in the
//! descriptor set: no route is written by hand.

use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor, ReflectMessage, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    Literal(String),
    /// Binds one path segment to a request field.
    Var(String),
}

#[derive(Debug, Clone)]
pub struct Route {
    pub method: http::Method,
    pub segments: Vec<Segment>,
    /// "" (no body), "*" (whole request) or a field name.
    pub body: String,
    /// "" (whole response) or the response field sent as the body.
    pub response_body: String,
    pub rpc: MethodDescriptor,
}

impl Route {
    /// Path variables when `path_segments` match this route's template.
    pub fn match_path(&self, path_segments: &[String]) -> Option<Vec<(String, String)>> {
        if path_segments.len() != self.segments.len() {
            return None;
        }
        let mut vars = vec![];
        for (seg, got) in self.segments.iter().zip(path_segments) {
            match seg {
                Segment::Literal(l) if l == got => {}
                Segment::Literal(_) => return None,
                Segment::Var(name) => {
                    if got.is_empty() {
                        return None;
                    }
                    vars.push((name.clone(), got.clone()));
                }
            }
        }
        Some(vars)
    }

    fn literal_count(&self) -> usize {
        self.segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("descriptor set: {0}")]
    Descriptor(String),
    #[error("{rpc}: bad http rule: {reason}")]
    Rule { rpc: String, reason: String },
}

/// Parses a path template such as `/v1/snapshots/{tag}/info`.
pub fn parse_template(t: &str) -> Result<Vec<Segment>, String> {
    let rest = t.strip_prefix('/').ok_or("template must start with '/'")?;
    rest.split('/')
        .map(|s| {
            if let Some(inner) = s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                let name = inner.split('=').next().unwrap_or("");
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(format!("bad variable {s:?}"));
                }
                Ok(Segment::Var(name.to_string()))
            } else if s.is_empty() || s.contains(['{', '}']) {
                Err(format!("bad segment {s:?}"))
            } else {
                Ok(Segment::Literal(s.to_string()))
            }
        })
        .collect()
}

/// Every route of `services` in `pool`.
pub fn load(pool: &DescriptorPool, services: &[&str]) -> Result<Vec<Route>, RouteError> {
    let ext = pool
        .get_extension_by_name("google.api.http")
        .ok_or_else(|| RouteError::Descriptor("google.api.http is not in the descriptor set".into()))?;
    let mut routes = vec![];
    for name in services {
        let svc =
            pool.get_service_by_name(name).ok_or_else(|| RouteError::Descriptor(format!("service {name} missing")))?;
        for m in svc.methods() {
            let opts = m.options();
            let rule = match opts.get_extension(&ext).into_owned() {
                Value::Message(rule) if rule.fields().next().is_some() => rule,
                _ => {
                    return Err(RouteError::Rule {
                        rpc: m.full_name().into(),
                        reason: "no google.api.http rule".into(),
                    });
                }
            };
            add_rule(&mut routes, &m, &rule, true)?;
        }
    }
    // More literal segments first, so `/v1/sandboxes/delete` wins over `/v1/sandboxes/{id}`.
    routes.sort_by_key(|r| std::cmp::Reverse(r.literal_count()));
    Ok(routes)
}

fn str_field(m: &DynamicMessage, name: &str) -> String {
    m.get_field_by_name(name).and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn add_rule(
    routes: &mut Vec<Route>,
    rpc: &MethodDescriptor,
    rule: &DynamicMessage,
    top: bool,
) -> Result<(), RouteError> {
    let err = |reason: String| RouteError::Rule { rpc: rpc.full_name().into(), reason };
    let mut found = None;
    for (verb, method) in [
        ("get", http::Method::GET),
        ("put", http::Method::PUT),
        ("post", http::Method::POST),
        ("delete", http::Method::DELETE),
        ("patch", http::Method::PATCH),
    ] {
        let field = rule.descriptor().get_field_by_name(verb).expect("HttpRule field");
        if rule.has_field(&field) {
            found = Some((method, str_field(rule, verb)));
        }
    }
    let (method, template) = found.ok_or_else(|| err("no verb".into()))?;
    let segments = parse_template(&template).map_err(err)?;
    let body = str_field(rule, "body");
    let response_body = str_field(rule, "response_body");
    for s in &segments {
        if let Segment::Var(v) = s
            && rpc.input().get_field_by_name(v).is_none()
        {
            return Err(err(format!("path variable {v} is not a field of {}", rpc.input().full_name())));
        }
    }
    if !body.is_empty() && body != "*" && rpc.input().get_field_by_name(&body).is_none() {
        return Err(err(format!("body field {body} does not exist")));
    }
    if !response_body.is_empty() && rpc.output().get_field_by_name(&response_body).is_none() {
        return Err(err(format!("response_body field {response_body} does not exist")));
    }
    routes.push(Route { method, segments, body, response_body, rpc: rpc.clone() });
    if top && let Some(Value::List(extra)) = rule.get_field_by_name("additional_bindings").map(|v| v.into_owned()) {
        for b in extra {
            if let Value::Message(b) = b {
                add_rule(routes, rpc, &b, false)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        assert_eq!(
            parse_template("/v1/snapshots/{tag}/info").unwrap(),
            vec![
                Segment::Literal("v1".into()),
                Segment::Literal("snapshots".into()),
                Segment::Var("tag".into()),
                Segment::Literal("info".into())
            ]
        );
        assert!(parse_template("v1/x").is_err());
        assert!(parse_template("/v1/{}").is_err());
        assert!(parse_template("/v1//x").is_err());
    }

    #[test]
    fn every_rpc_has_a_route() {
        let pool = DescriptorPool::decode(forkd_api::FILE_DESCRIPTOR_SET).unwrap();
        let routes = load(&pool, forkd_api::SERVICES).unwrap();
        for name in forkd_api::SERVICES {
            for m in pool.get_service_by_name(name).unwrap().methods() {
                assert!(routes.iter().any(|r| r.rpc.full_name() == m.full_name()), "{}", m.full_name());
            }
        }
        let list = routes.iter().find(|r| r.rpc.name() == "ListSnapshots").unwrap();
        assert_eq!(list.response_body, "snapshots");
        let info: Vec<_> = routes.iter().filter(|r| r.rpc.name() == "GetSnapshot").collect();
        assert_eq!(info.len(), 2, "GetSnapshot has an additional binding");
    }
}
