//! API servers for tests, with the real Kubernetes JSON of cli/testdata/: [`scripted`], a
//! `kube::Client` whose every GET is answered by a function of its path and query (for
//! commands that only read, in any order), and [`ordered`], one that expects a script of
//! requests in order, writes included, and hands back what each carried. Both record what was
//! asked, so tests can check the commands read through the proxies they should.

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

/// A scripted API server's answer.
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub date: Option<&'static str>,
}

impl Answer {
    pub fn json(status: u16, body: &Value) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(body).unwrap(),
            date: None,
        }
    }

    pub fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
            date: None,
        }
    }

    /// A Kubernetes `Status` failure.
    pub fn failure(code: u16, reason: &str, message: &str) -> Self {
        Self::json(code, &failure(code, reason, message))
    }

    pub fn dated(mut self, date: &'static str) -> Self {
        self.date = Some(date);
        self
    }
}

/// A Kubernetes `Status` failure, as the API server sends it.
pub fn failure(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// The requests served, as `path?query`.
pub type Log = Arc<Mutex<Vec<String>>>;

/// A client whose API server answers each request with `answer(path_and_query)`.
pub fn scripted(
    answer: impl Fn(&str) -> Answer + Send + 'static,
) -> (kube::Client, Log, tokio::task::JoinHandle<()>) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let log: Log = Arc::default();
    let seen = log.clone();
    let server = tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            assert_eq!(request.method(), "GET", "{}", request.uri());
            let target = request
                .uri()
                .path_and_query()
                .map_or_else(String::new, ToString::to_string);
            let answer = answer(&target);
            seen.lock().unwrap().push(target);
            let mut response = Response::builder()
                .status(answer.status)
                .header("content-type", answer.content_type);
            if let Some(date) = answer.date {
                response = response.header("date", date);
            }
            send.send_response(response.body(Body::from(answer.body)).unwrap());
        }
    });
    (kube::Client::new(svc, "default"), log, server)
}

/// A testdata file as JSON.
pub fn testdata(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One exchange of an [`ordered`] script: the request expected, the answer given.
pub struct Reply {
    pub method: &'static str,
    pub path: String,
    pub code: u16,
    /// `None`: the request's own body, as the API server returns what it created.
    pub body: Option<Value>,
}

impl Reply {
    /// A Kubernetes `Status` failure.
    pub fn status(code: u16, reason: &str, message: &str) -> Self {
        Self {
            code,
            ..ok(failure(code, reason, message))
        }
    }

    /// The same answer with another HTTP status (201 for a create).
    pub fn with_code(self, code: u16) -> Self {
        Self { code, ..self }
    }
}

/// `reply`, expected for `method` on `path`.
pub fn on(method: &'static str, path: &str, reply: Reply) -> Reply {
    Reply {
        method,
        path: path.to_string(),
        ..reply
    }
}

pub fn ok(body: Value) -> Reply {
    Reply {
        method: "",
        path: String::new(),
        code: 200,
        body: Some(body),
    }
}

/// 201 with what was sent.
pub fn created() -> Reply {
    Reply {
        method: "",
        path: String::new(),
        code: 201,
        body: None,
    }
}

/// `kind` is the resource as the API server names it: `secrets`, `peers.trellis.dev`.
pub fn not_found(kind: &str, name: &str) -> Reply {
    Reply::status(404, "NotFound", &format!("{kind} \"{name}\" not found"))
}

/// A request as the API server saw it.
#[derive(Debug)]
pub struct Seen {
    pub method: String,
    /// `path?query`.
    pub uri: String,
    pub body: Option<Value>,
}

/// A client whose API server answers `replies` in order, asserting each request's method and
/// path; the task returns the requests seen.
pub fn ordered(replies: Vec<Reply>) -> (kube::Client, tokio::task::JoinHandle<Vec<Seen>>) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn(async move {
        let mut seen = Vec::new();
        for reply in replies {
            let Some((req, send)) = handle.next_request().await else {
                panic!(
                    "the command stopped before {} {}; it sent {seen:#?}",
                    reply.method, reply.path
                );
            };
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            assert_eq!(
                (method.as_str(), req.uri().path()),
                (reply.method, reply.path.as_str()),
                "request {} (after {seen:#?})",
                seen.len() + 1
            );
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Option<Value> =
                (!bytes.is_empty()).then(|| serde_json::from_slice(&bytes).unwrap());
            let answer = reply.body.clone().or_else(|| body.clone()).unwrap();
            send.send_response(
                Response::builder()
                    .status(reply.code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
            seen.push(Seen { method, uri, body });
        }
        seen
    });
    (kube::Client::new(svc, "default"), task)
}
