//! An API server for tests: a `kube::Client` whose every request is answered by a function of
//! its path and query, with the real Kubernetes JSON of cli/testdata/. It records what was
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
        Self::json(
            code,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": message, "reason": reason, "code": code}),
        )
    }

    pub fn dated(mut self, date: &'static str) -> Self {
        self.date = Some(date);
        self
    }
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
