//! What the scripted-API tests share: every request the scripted API server sees is recorded
//! as the RBAC check sees it (verb, API group, resource, namespace, name) and checked against
//! the chart's rules; every object written is validated against its schema (the MCS CRDs'
//! `v1beta1` `openAPIV3Schema` from the chart, `discovery.k8s.io/v1` EndpointSlices and v1
//! Services through k8s-openapi's types, refusing unknown fields).

// Each test binary uses part of this module.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use http::{Method, Request};
use serde_json::Value;

/// One API request as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiCall {
    pub verb: &'static str,
    pub group: String,
    /// With its subresource: `serviceimports/status`.
    pub resource: String,
    pub namespace: Option<String>,
    /// The object's name, or the `metadata.name` a field selector narrows a list to.
    pub name: Option<String>,
}

impl ApiCall {
    pub fn of<B>(req: &Request<B>) -> ApiCall {
        let path = req.uri().path();
        let query = req.uri().query().unwrap_or("");
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match parts.as_slice() {
            ["api", _version, rest @ ..] => (String::new(), rest),
            ["apis", group, _version, rest @ ..] => ((*group).to_owned(), rest),
            _ => panic!("not an API path: {path}"),
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
            _ => (None, rest),
        };
        let (resource, name) = match rest {
            [resource] => ((*resource).to_owned(), None),
            [resource, name] => ((*resource).to_owned(), Some((*name).to_owned())),
            [resource, name, sub] => (format!("{resource}/{sub}"), Some((*name).to_owned())),
            _ => panic!("not a resource path: {path}"),
        };
        let param = |key: &str| {
            query.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == key).then(|| v.replace("%3D", "=").replace("%2F", "/"))
            })
        };
        let verb = match *req.method() {
            Method::GET if name.is_some() => "get",
            Method::GET if param("watch").as_deref() == Some("true") => "watch",
            Method::GET => "list",
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE if name.is_some() => "delete",
            Method::DELETE => "deletecollection",
            ref other => panic!("unexpected method {other}"),
        };
        let name = name.or_else(|| {
            param("fieldSelector").and_then(|s| s.strip_prefix("metadata.name=").map(str::to_owned))
        });
        ApiCall {
            verb,
            group,
            resource,
            namespace,
            name,
        }
    }
}

/// The calls a scripted API server saw, shared with the test.
#[derive(Debug, Clone, Default)]
pub struct Calls(pub Arc<Mutex<Vec<ApiCall>>>);

impl Calls {
    pub fn record<B>(&self, req: &Request<B>) {
        self.0.lock().unwrap().push(ApiCall::of(req));
    }

    pub fn all(&self) -> Vec<ApiCall> {
        self.0.lock().unwrap().clone()
    }

    pub fn count(&self, verb: &str, resource: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.verb == verb && c.resource == resource)
            .count()
    }

    /// Panics naming every call the chart's controller RBAC does not allow.
    pub fn assert_allowed_by_the_chart(&self) {
        let rbac = Rbac::controller();
        let calls = self.all();
        assert!(!calls.is_empty(), "no API call was recorded");
        let denied: Vec<&ApiCall> = calls.iter().filter(|c| !rbac.allows(c)).collect();
        assert!(
            denied.is_empty(),
            "the chart's RBAC does not allow: {denied:#?}"
        );
    }
}

/// The release namespace and controller name the chart's templates are read with (the tests'
/// scripted requests use the same).
pub const RELEASE_NAMESPACE: &str = "trellis-system";
pub const CONTROLLER_NAME: &str = "trellis-controller";

#[derive(Debug, Clone)]
pub struct Rule {
    pub groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    pub names: Option<Vec<String>>,
    /// A Role's rule: only in its namespace.
    pub namespace: Option<String>,
}

/// The rules of the controller's ClusterRole and Role in `helm/trellis/templates/rbac.yaml`.
#[derive(Debug, Clone)]
pub struct Rbac {
    pub rules: Vec<Rule>,
}

impl Rbac {
    pub fn controller() -> Rbac {
        let path = format!(
            "{}/../helm/trellis/templates/rbac.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        Rbac::parse(&std::fs::read_to_string(path).unwrap())
    }

    /// Reads the raw template: lines that are only template actions (`{{- if ... }}`,
    /// `{{- include ... | nindent 4 }}`) are dropped, the controller's name and the release
    /// namespace substituted where the templates write them.
    pub fn parse(template: &str) -> Rbac {
        let text: String = template
            .lines()
            .filter(|l| {
                let t = l.trim();
                !(t.starts_with("{{") && t.ends_with("}}"))
            })
            .map(|l| {
                let mut l = l.replace("{{ .Release.Namespace }}", RELEASE_NAMESPACE);
                // `{{ include "trellis.controller" . }}` names `trellis-controller`, and so on.
                let include = "{{ include \"trellis.";
                while let Some(start) = l.find(include) {
                    let end = start + l[start..].find("}}").unwrap() + 2;
                    let component = l[start + include.len()..end].split('"').next().unwrap();
                    l = format!("{}trellis-{component}{}", &l[..start], &l[end..]);
                }
                assert!(!l.contains("{{"), "an unhandled template action: {l}");
                l + "\n"
            })
            .collect();
        let mut rules = Vec::new();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let doc: Value = serde::Deserialize::deserialize(doc).unwrap();
            let kind = doc["kind"].as_str().unwrap_or("");
            if !matches!(kind, "ClusterRole" | "Role") || doc["metadata"]["name"] != CONTROLLER_NAME
            {
                continue;
            }
            let namespace =
                (kind == "Role").then(|| doc["metadata"]["namespace"].as_str().unwrap().to_owned());
            let strings = |v: &Value| -> Vec<String> {
                v.as_array()
                    .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
                    .unwrap_or_default()
            };
            for rule in doc["rules"].as_array().unwrap() {
                rules.push(Rule {
                    groups: strings(&rule["apiGroups"]),
                    resources: strings(&rule["resources"]),
                    verbs: strings(&rule["verbs"]),
                    names: rule.get("resourceNames").map(strings),
                    namespace: namespace.clone(),
                });
            }
        }
        assert!(!rules.is_empty(), "no controller rules in the chart");
        Rbac { rules }
    }

    pub fn allows(&self, call: &ApiCall) -> bool {
        let any = |list: &[String], want: &str| list.iter().any(|x| x == "*" || x == want);
        self.rules.iter().any(|r| {
            any(&r.groups, &call.group)
                && any(&r.resources, &call.resource)
                && any(&r.verbs, call.verb)
                && r.namespace
                    .as_ref()
                    .is_none_or(|ns| call.namespace.as_ref() == Some(ns))
                && r.names
                    .as_ref()
                    .is_none_or(|names| call.name.as_ref().is_some_and(|n| names.contains(n)))
        })
    }
}

/// The schema of a CRD (by its name) at `version`, from the chart.
pub fn crd_schema(crd: &str, version: &str) -> Value {
    let path = format!(
        "{}/../helm/trellis/crds/trellis-crds.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(path).unwrap();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let doc: Value = serde::Deserialize::deserialize(doc).unwrap();
        if doc["metadata"]["name"] == crd {
            let version = doc["spec"]["versions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == version)
                .unwrap();
            return version["schema"]["openAPIV3Schema"].clone();
        }
    }
    panic!("no CRD {crd} in the chart");
}

/// The ServiceImport CRD's schema (the version the controller writes, `v1beta1`).
pub fn service_import_schema() -> Value {
    crd_schema("serviceimports.multicluster.x-k8s.io", "v1beta1")
}

/// Validates `value` against a structural CRD schema (the subset CRDs use: types, properties,
/// required, items, maxItems, enum, nullable, additionalProperties, preserve-unknown-fields); an unknown
/// field is an error, as the API server would prune it. `apiVersion`, `kind` and `metadata`
/// at the root are the API server's.
pub fn validate_against_crd(schema: &Value, value: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let Some(obj) = value.as_object() else {
        return vec!["the object is not a JSON object".into()];
    };
    let mut root = obj.clone();
    for key in ["apiVersion", "kind"] {
        if !root.remove(key).is_some_and(|v| v.is_string()) {
            errors.push(format!("{key} missing or not a string"));
        }
    }
    if let Some(meta) = root.remove("metadata")
        && let Err(e) = serde_json::from_value::<
            k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        >(meta)
    {
        errors.push(format!("metadata: {e}"));
    }
    check(schema, &Value::Object(root), "", &mut errors);
    errors
}

fn check(schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    if value.is_null() {
        if schema["nullable"] != true {
            errors.push(format!("{at}: null is not allowed"));
        }
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        errors.push(format!("{at}: {value} is not one of {allowed:?}"));
    }
    let ok = match schema["type"].as_str() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        _ => true,
    };
    if !ok {
        errors.push(format!("{at}: {value} is not of type {}", schema["type"]));
        return;
    }
    if schema["format"] == "int32"
        && let Some(n) = value.as_i64()
        && i32::try_from(n).is_err()
    {
        errors.push(format!("{at}: {n} is not an int32"));
    }
    if let Some(items) = value.as_array() {
        if let Some(max) = schema["maxItems"].as_u64()
            && items.len() as u64 > max
        {
            errors.push(format!(
                "{at}: {} items, at most {max} allowed",
                items.len()
            ));
        }
        for (i, item) in items.iter().enumerate() {
            check(&schema["items"], item, &format!("{at}[{i}]"), errors);
        }
    }
    if let Some(fields) = value.as_object() {
        for required in schema["required"].as_array().into_iter().flatten() {
            let required = required.as_str().unwrap();
            if !fields.contains_key(required) {
                errors.push(format!("{at}: required field {required} missing"));
            }
        }
        let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
        for (key, field) in fields {
            let path = format!("{at}.{key}");
            match (
                schema["properties"].get(key),
                schema.get("additionalProperties"),
            ) {
                (Some(sub), _) => check(sub, field, &path, errors),
                (None, Some(extra)) if extra.is_object() => check(extra, field, &path, errors),
                _ if preserve => {}
                _ => errors.push(format!("{path}: unknown field")),
            }
        }
    }
}

/// Validates an EndpointSlice as `discovery.k8s.io/v1` defines it: it must deserialize into
/// k8s-openapi's type (right kind, required fields, field types) and lose nothing doing so
/// (an unknown or misspelt field would be dropped: refused here).
pub fn validate_endpoint_slice(value: &Value) -> Vec<String> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let slice: EndpointSlice = match serde_json::from_value(value.clone()) {
        Ok(s) => s,
        Err(e) => return vec![format!("not an EndpointSlice: {e}")],
    };
    let mut errors = Vec::new();
    if !["IPv4", "IPv6", "FQDN"].contains(&slice.address_type.as_str()) {
        errors.push(format!(
            "addressType {} is not IPv4, IPv6 or FQDN",
            slice.address_type
        ));
    }
    let round_trip = serde_json::to_value(&slice).unwrap();
    let original = without_nulls(value);
    if round_trip != original {
        errors.push(format!(
            "fields unknown to discovery.k8s.io/v1 EndpointSlice: {original} became {round_trip}"
        ));
    }
    errors
}

fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// Validates a core v1 Service as [`validate_endpoint_slice`] does an EndpointSlice.
pub fn validate_service(value: &Value) -> Vec<String> {
    use k8s_openapi::api::core::v1::Service;
    let svc: Service = match serde_json::from_value(value.clone()) {
        Ok(s) => s,
        Err(e) => return vec![format!("not a Service: {e}")],
    };
    let round_trip = serde_json::to_value(&svc).unwrap();
    let original = without_nulls(value);
    if round_trip != original {
        return vec![format!(
            "fields unknown to v1 Service: {original} became {round_trip}"
        )];
    }
    Vec::new()
}

/// Validates an object the controller sends, by its kind (MCS objects as `v1beta1`, the
/// version it writes).
pub fn validate_written(value: &Value) -> Vec<String> {
    let mcs = |crd: &str| {
        if value["apiVersion"] != "multicluster.x-k8s.io/v1beta1" {
            return vec![format!("written as {}, not v1beta1", value["apiVersion"])];
        }
        validate_against_crd(&crd_schema(crd, "v1beta1"), value)
    };
    match value["kind"].as_str() {
        Some("ServiceImport") => mcs("serviceimports.multicluster.x-k8s.io"),
        Some("ServiceExport") => mcs("serviceexports.multicluster.x-k8s.io"),
        Some("EndpointSlice") => validate_endpoint_slice(value),
        Some("Service") => validate_service(value),
        other => vec![format!("unexpected kind {other:?}")],
    }
}
