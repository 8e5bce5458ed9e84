//! A mock Kubernetes API server on 127.0.0.1, for the kube source's client
//! tests, its benchmark and the node lab: Services, EndpointSlices and Pods,
//! listed (paged, with a resourceVersion) and watched (`?watch=true`, JSON
//! lines, replayed from the resourceVersion asked for), across all
//! namespaces or one, with label selectors and field selectors (`=`, `==`,
//! `!=` on any dotted path, such as `spec.nodeName=worker-1`). Tests drive it: put and remove objects, end watches with a 410
//! Gone ERROR event, answer the next requests with an error status, drop
//! watch connections, or go down (every connection closed) and come back.
//!
//! It answers as the apiserver does where the client can tell: list items
//! without `kind`/`apiVersion`, `Status` bodies on errors, deleted objects
//! sent with the deletion's resourceVersion, an object leaving a watch's
//! label selector sent as DELETED.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request as HttpRequest, Response, StatusCode, body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc, task::AbortHandle};
use tokio_stream::wrappers::UnboundedReceiverStream;

type Body = BoxBody<Bytes, io::Error>;
type Line = Result<Frame<Bytes>, io::Error>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    Pods,
}

impl Resource {
    fn kind(self) -> &'static str {
        match self {
            Self::Services => "Service",
            Self::EndpointSlices => "EndpointSlice",
            Self::Pods => "Pod",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::Services | Self::Pods => "v1",
            Self::EndpointSlices => "discovery.k8s.io/v1",
        }
    }

    fn of_kind(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Self::Services),
            "EndpointSlice" => Some(Self::EndpointSlices),
            "Pod" => Some(Self::Pods),
            _ => None,
        }
    }
}

/// A request as the mock saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub resource: Resource,
    pub namespace: Option<String>,
    pub watch: bool,
    pub query: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: Resource,
    namespace: String,
    /// The object before (`None`: added).
    old: Option<Arc<Value>>,
    /// The object after (for a deletion: its last state, with the
    /// deletion's resourceVersion).
    new: Arc<Value>,
    deleted: bool,
}

struct Watch {
    resource: Resource,
    namespace: Option<String>,
    selector: Option<Vec<Requirement>>,
    fields: Option<Vec<Requirement>>,
    tx: mpsc::UnboundedSender<Line>,
}

/// An object, and its JSON as a list item (without kind/apiVersion), encoded
/// once: lists of 10k objects are then cheap to serve.
struct Stored {
    object: Arc<Value>,
    item: Bytes,
}

impl Stored {
    fn new(object: Value) -> Self {
        let mut item = object.clone();
        if let Some(map) = item.as_object_mut() {
            map.remove("kind");
            map.remove("apiVersion");
        }
        Self {
            item: Bytes::from(serde_json::to_vec(&item).expect("JSON")),
            object: Arc::new(object),
        }
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Resource, String, String), Stored>,
    history: Vec<Change>,
    /// A watch from a resourceVersion below this gets 410 Gone.
    oldest_watchable: u64,
    watches: Vec<Watch>,
    faults: HashMap<Resource, VecDeque<StatusCode>>,
    down: bool,
    /// Connections closed unanswered while down.
    refused: usize,
    connections: Vec<AbortHandle>,
    requests: Vec<Request>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every request and every change of the watch set, so tests
    /// can wait for the client to reach a point without sleeping.
    progress: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn bump(&self) {
        self.progress.send_modify(|n| *n += 1);
    }

    fn expire_watches(&self, resource: Resource) {
        let mut state = self.state.lock();
        state.oldest_watchable = state.rv + 1;
        let line = gone_event(state.rv);
        state.watches.retain(|w| {
            if w.resource == resource {
                let _ = w.tx.send(Ok(Frame::data(line.clone())));
                false
            } else {
                true
            }
        });
        drop(state);
        self.bump();
    }

    fn put(&self, object: &Value) -> u64 {
        let (resource, namespace, name) = identify(object);
        let mut state = self.state.lock();
        state.rv += 1;
        let rv = state.rv;
        let mut object = object.clone();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let stored = Stored::new(object);
        let new = stored.object.clone();
        let old = state
            .objects
            .insert((resource, namespace.clone(), name), stored)
            .map(|old| old.object);
        state.record(Change {
            rv,
            resource,
            namespace,
            old,
            new,
            deleted: false,
        });
        drop(state);
        self.bump();
        rv
    }
}

pub struct MockApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for MockApiServer {
    fn drop(&mut self) {
        self.accept.abort();
        for conn in self.shared.state.lock().connections.drain(..) {
            conn.abort();
        }
    }
}

impl MockApiServer {
    /// Listens on 127.0.0.1 (a free port).
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("loopback address")).await
    }

    pub async fn start_on(addr: SocketAddr) -> Self {
        assert!(addr.ip().is_loopback(), "the mock serves on loopback only");
        let listener = TcpListener::bind(addr)
            .await
            .expect("bind the mock API server");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            progress: tokio::sync::watch::channel(0).0,
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Self {
            addr,
            shared,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kube client for this server (plain HTTP).
    pub fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr).parse().expect("mock URL");
        kube::Client::try_from(kube::Config::new(url)).expect("a client for the mock")
    }

    /// Adds or replaces an object (its `kind` says which resource), as a
    /// write to the apiserver: a new resourceVersion, an event to watchers.
    /// Returns the object's new resourceVersion.
    pub fn put(&self, object: &Value) -> u64 {
        self.shared.put(object)
    }

    /// Objects present from the start (no history: a watch can only start
    /// from the resourceVersion a list returns).
    pub fn load(&self, objects: impl IntoIterator<Item = Value>) {
        let mut state = self.shared.state.lock();
        for mut object in objects {
            let (resource, namespace, name) = identify(&object);
            state.rv += 1;
            object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
            state
                .objects
                .insert((resource, namespace, name), Stored::new(object));
        }
        state.oldest_watchable = state.rv;
    }

    /// Deletes an object; returns whether it existed.
    pub fn remove(&self, resource: Resource, namespace: &str, name: &str) -> bool {
        let mut state = self.shared.state.lock();
        let Some(old) = state
            .objects
            .remove(&(resource, namespace.to_owned(), name.to_owned()))
            .map(|old| old.object)
        else {
            return false;
        };
        state.rv += 1;
        let rv = state.rv;
        let mut last = (*old).clone();
        last["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.record(Change {
            rv,
            resource,
            namespace: namespace.to_owned(),
            old: Some(old),
            new: Arc::new(last),
            deleted: true,
        });
        drop(state);
        self.shared.bump();
        true
    }

    /// Ends every watch of `resource` with an ERROR event carrying 410 Gone,
    /// and makes any resourceVersion seen so far too old to watch from: the
    /// client must relist.
    pub fn expire_watches(&self, resource: Resource) {
        self.shared.expire_watches(resource);
    }

    /// Breaks every watch connection of `resource` mid-stream.
    pub fn drop_watches(&self, resource: Resource) {
        let mut state = self.shared.state.lock();
        state.watches.retain(|w| {
            if w.resource == resource {
                let _ = w.tx.send(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "mock: watch connection dropped",
                )));
                false
            } else {
                true
            }
        });
        drop(state);
        self.shared.bump();
    }

    /// Answers the next `times` requests for `resource` with `status`.
    pub fn fail_next(&self, resource: Resource, status: u16, times: usize) {
        let status = StatusCode::from_u16(status).expect("an HTTP status");
        let mut state = self.shared.state.lock();
        let queue = state.faults.entry(resource).or_default();
        queue.extend(std::iter::repeat_n(status, times));
    }

    /// Down: every open connection is cut and new ones are closed at once
    /// (an apiserver restarting). Up again: served as before, history kept.
    pub fn set_down(&self, down: bool) {
        let mut state = self.shared.state.lock();
        state.down = down;
        if down {
            state.watches.clear();
            for conn in state.connections.drain(..) {
                conn.abort();
            }
        }
        drop(state);
        self.shared.bump();
    }

    /// Connections closed unanswered while down.
    pub fn refused(&self) -> usize {
        self.shared.state.lock().refused
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.state.lock().requests.clone()
    }

    pub fn active_watches(&self, resource: Resource) -> usize {
        let mut state = self.shared.state.lock();
        state.watches.retain(|w| !w.tx.is_closed());
        state
            .watches
            .iter()
            .filter(|w| w.resource == resource)
            .count()
    }

    /// Waits (without sleeping) until `check` holds, up to `limit`.
    pub async fn wait_until(&self, limit: Duration, mut check: impl FnMut(&Self) -> bool) {
        let mut progress = self.shared.progress.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        while !check(self) {
            match tokio::time::timeout_at(deadline, progress.changed()).await {
                Ok(Ok(())) => {}
                _ => panic!("mock API server: condition not reached within {limit:?}"),
            }
        }
    }
}

impl State {
    fn record(&mut self, change: Change) {
        let mut gone = Vec::new();
        for (i, watch) in self.watches.iter().enumerate() {
            if let Some(line) = event_for(watch_view(watch), &change)
                && watch.tx.send(Ok(Frame::data(line))).is_err()
            {
                gone.push(i);
            }
        }
        for i in gone.into_iter().rev() {
            self.watches.remove(i);
        }
        self.history.push(change);
    }
}

struct WatchView<'a> {
    resource: Resource,
    namespace: Option<&'a str>,
    selector: Option<&'a [Requirement]>,
    fields: Option<&'a [Requirement]>,
}

fn watch_view(w: &Watch) -> WatchView<'_> {
    WatchView {
        resource: w.resource,
        namespace: w.namespace.as_deref(),
        selector: w.selector.as_deref(),
        fields: w.fields.as_deref(),
    }
}

/// The event a watch sees for a change, if any: a label selector turns an
/// object entering it into ADDED and one leaving it into DELETED.
fn event_for(watch: WatchView<'_>, change: &Change) -> Option<Bytes> {
    if change.resource != watch.resource || watch.namespace.is_some_and(|ns| ns != change.namespace)
    {
        return None;
    }
    let matches = |obj: &Value| {
        watch.selector.is_none_or(|s| selects(s, obj))
            && watch.fields.is_none_or(|f| selects_fields(f, obj))
    };
    let before = change.old.as_deref().is_some_and(matches);
    let after = !change.deleted && matches(&change.new);
    let kind = match (before, after) {
        (false, true) => "ADDED",
        (true, true) => "MODIFIED",
        (true, false) => "DELETED",
        (false, false) => return None,
    };
    Some(line(&json!({ "type": kind, "object": *change.new })))
}

fn line(value: &Value) -> Bytes {
    let mut text = serde_json::to_vec(value).expect("JSON");
    text.push(b'\n');
    Bytes::from(text)
}

fn gone_event(rv: u64) -> Bytes {
    line(&json!({
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("too old resource version: 1 ({rv})"),
            "reason": "Expired",
            "code": 410
        }
    }))
}

fn identify(object: &Value) -> (Resource, String, String) {
    let resource = object["kind"]
        .as_str()
        .and_then(Resource::of_kind)
        .expect("a Service, EndpointSlice or Pod with its kind");
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .expect("metadata.namespace")
        .to_owned();
    let name = object["metadata"]["name"]
        .as_str()
        .expect("metadata.name")
        .to_owned();
    (resource, namespace, name)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        {
            let mut state = shared.state.lock();
            if state.down {
                state.refused += 1;
                drop(state);
                drop(stream);
                shared.bump();
                continue;
            }
        }
        let conn_shared = shared.clone();
        let service = service_fn(move |req| {
            let shared = conn_shared.clone();
            async move { Ok::<_, Infallible>(handle(&shared, req).await) }
        });
        let task = tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        let mut state = shared.state.lock();
        state.connections.retain(|c| !c.is_finished());
        state.connections.push(task.abort_handle());
    }
}

fn route(path: &str) -> Option<(Resource, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "services"] => Some((Resource::Services, None)),
        ["api", "v1", "pods"] => Some((Resource::Pods, None)),
        ["api", "v1", "namespaces", ns, "pods"] => Some((Resource::Pods, Some((*ns).into()))),
        ["api", "v1", "namespaces", ns, "services"] => {
            Some((Resource::Services, Some((*ns).into())))
        }
        ["apis", "discovery.k8s.io", "v1", "endpointslices"] => {
            Some((Resource::EndpointSlices, None))
        }
        [
            "apis",
            "discovery.k8s.io",
            "v1",
            "namespaces",
            ns,
            "endpointslices",
        ] => Some((Resource::EndpointSlices, Some((*ns).into()))),
        _ => None,
    }
}

/// Where a benchmark in another process writes objects: `POST` one object
/// (JSON) to it, as [`MockApiServer::put`].
pub const PUT_PATH: &str = "/mock/objects";

/// Where a benchmark in another process forces a relist: a `POST` to it ends
/// every watch of both resources with 410 Gone, as
/// [`MockApiServer::expire_watches`] (an apiserver that compacted past the
/// clients' resourceVersions).
pub const EXPIRE_PATH: &str = "/mock/expire";

async fn handle(shared: &Shared, req: HttpRequest<hyper::body::Incoming>) -> Response<Body> {
    if req.uri().path() == PUT_PATH && req.method() == hyper::Method::POST {
        let body = match req.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        };
        return match serde_json::from_slice::<Value>(&body) {
            Ok(object)
                if object["kind"]
                    .as_str()
                    .and_then(Resource::of_kind)
                    .is_some() =>
            {
                let rv = shared.put(&object);
                json_response(
                    StatusCode::CREATED,
                    full(line(&json!({ "resourceVersion": rv.to_string() }))),
                )
            }
            _ => status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "expected a Service, EndpointSlice or Pod",
            ),
        };
    }
    if req.uri().path() == EXPIRE_PATH && req.method() == hyper::Method::POST {
        for resource in [Resource::Services, Resource::EndpointSlices, Resource::Pods] {
            shared.expire_watches(resource);
        }
        return json_response(StatusCode::OK, full(line(&json!({}))));
    }
    let query = parse_query(req.uri().query().unwrap_or(""));
    let Some((resource, namespace)) = route(req.uri().path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if req.method() != hyper::Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "read-only mock",
        );
    }
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let mut state = shared.state.lock();
    state.requests.push(Request {
        resource,
        namespace: namespace.clone(),
        watch,
        query: query.clone(),
    });
    let fault = state
        .faults
        .get_mut(&resource)
        .and_then(VecDeque::pop_front);
    let response = if let Some(code) = fault {
        let reason = match code.as_u16() {
            500 => "InternalError",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "Unknown",
        };
        status(code, reason, "mock: injected failure")
    } else {
        let parsed = |key: &str| match query.get(key).map(|s| parse_selector(s)) {
            None => Ok(None),
            Some(Ok(s)) => Ok(Some(s)),
            Some(Err(e)) => Err(e),
        };
        match (parsed("labelSelector"), parsed("fieldSelector")) {
            (Err(e), _) | (_, Err(e)) => status(StatusCode::BAD_REQUEST, "BadRequest", &e),
            (Ok(selector), Ok(fields)) => {
                let filter = Filter { selector, fields };
                if watch {
                    start_watch(&mut state, resource, namespace, filter, &query)
                } else {
                    list(&state, resource, namespace.as_deref(), &filter, &query)
                }
            }
        }
    };
    drop(state);
    shared.bump();
    response
}

/// A request's label and field selectors.
struct Filter {
    selector: Option<Vec<Requirement>>,
    fields: Option<Vec<Requirement>>,
}

fn list(
    state: &State,
    resource: Resource,
    namespace: Option<&str>,
    filter: &Filter,
    query: &BTreeMap<String, String>,
) -> Response<Body> {
    let offset: usize = query
        .get("continue")
        .and_then(|c| c.strip_prefix('o'))
        .and_then(|o| o.parse().ok())
        .unwrap_or(0);
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let matching = state.objects.iter().filter(|((r, ns, _), stored)| {
        *r == resource
            && namespace.is_none_or(|n| n == ns)
            && filter
                .selector
                .as_deref()
                .is_none_or(|s| selects(s, &stored.object))
            && filter
                .fields
                .as_deref()
                .is_none_or(|f| selects_fields(f, &stored.object))
    });
    let mut items = Vec::new();
    let mut more = false;
    for (i, (_, stored)) in matching.skip(offset).enumerate() {
        if i == limit {
            more = true;
            break;
        }
        items.push(stored.item.clone());
    }
    let mut metadata = json!({ "resourceVersion": state.rv.to_string() });
    if more {
        metadata["continue"] = json!(format!("o{}", offset + items.len()));
    }
    let mut text = format!(
        "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{},\"items\":[",
        resource.kind(),
        resource.api_version(),
        metadata
    )
    .into_bytes();
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            text.push(b',');
        }
        text.extend_from_slice(item);
    }
    text.extend_from_slice(b"]}\n");
    json_response(StatusCode::OK, full(Bytes::from(text)))
}

fn start_watch(
    state: &mut State,
    resource: Resource,
    namespace: Option<String>,
    filter: Filter,
    query: &BTreeMap<String, String>,
) -> Response<Body> {
    let Filter { selector, fields } = filter;
    let from = query
        .get("resourceVersion")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|v| *v != 0)
        .unwrap_or(state.rv);
    if from < state.oldest_watchable {
        // As the apiserver: 200, then one ERROR event, then the end.
        let line = gone_event(state.rv);
        return json_response(StatusCode::OK, full(line));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let view = WatchView {
        resource,
        namespace: namespace.as_deref(),
        selector: selector.as_deref(),
        fields: fields.as_deref(),
    };
    for change in state.history.iter().filter(|c| c.rv > from) {
        if let Some(line) = event_for(
            WatchView {
                resource: view.resource,
                namespace: view.namespace,
                selector: view.selector,
                fields: view.fields,
            },
            change,
        ) {
            let _ = tx.send(Ok(Frame::data(line)));
        }
    }
    state.watches.push(Watch {
        resource,
        namespace,
        selector,
        fields,
        tx,
    });
    let body = StreamBody::new(UnboundedReceiverStream::new(rx)).boxed();
    json_response(StatusCode::OK, body)
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn json_response(code: StatusCode, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    json_response(code, full(line(&body)))
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The label selector forms the tests use.
#[derive(Clone, Debug)]
enum Requirement {
    Equal(String, String),
    NotEqual(String, String),
    Exists(String),
    DoesNotExist(String),
}

fn parse_selector(text: &str) -> Result<Vec<Requirement>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| {
            if let Some(key) = r.strip_prefix('!') {
                Ok(Requirement::DoesNotExist(key.into()))
            } else if let Some((k, v)) = r.split_once("!=") {
                Ok(Requirement::NotEqual(k.into(), v.into()))
            } else if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
                Ok(Requirement::Equal(k.into(), v.into()))
            } else if r.contains(' ') || r.contains('(') {
                Err(format!("unable to parse requirement: {r:?}"))
            } else {
                Ok(Requirement::Exists(r.into()))
            }
        })
        .collect()
}

fn selects(selector: &[Requirement], object: &Value) -> bool {
    let label = |k: &str| object["metadata"]["labels"][k].as_str().map(str::to_owned);
    selector.iter().all(|r| match r {
        Requirement::Equal(k, v) => label(k).as_deref() == Some(v),
        Requirement::NotEqual(k, v) => label(k).as_deref() != Some(v),
        Requirement::Exists(k) => label(k).is_some(),
        Requirement::DoesNotExist(k) => label(k).is_none(),
    })
}

/// A field selector on an object: each key a dotted path to a string (a
/// path that is absent reads as ""). Existence tests are not field selector
/// syntax, so they never match.
fn selects_fields(selector: &[Requirement], object: &Value) -> bool {
    let field = |path: &str| {
        path.split('.')
            .try_fold(object, |v, key| v.get(key))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    selector.iter().all(|r| match r {
        Requirement::Equal(k, v) => field(k) == *v,
        Requirement::NotEqual(k, v) => field(k) != *v,
        Requirement::Exists(_) | Requirement::DoesNotExist(_) => false,
    })
}

/// A cluster of `services` Services (spread over 50 namespaces, each with
/// `ports` TCP ports and a ClusterIP) and one EndpointSlice each, holding
/// `endpoints` ready endpoints in all, shaped as the apiserver sends them.
/// Addresses are in 10.0.0.0/8 and never connected to.
pub fn synthetic_cluster(services: usize, endpoints: usize, ports: usize) -> Vec<Value> {
    const PORT_NAMES: [&str; 4] = ["http", "grpc", "metrics", "admin"];
    let ip =
        |base: usize, i: usize| format!("10.{}.{}.{}", base + i / 65536, (i / 256) % 256, i % 256);
    let suffix = |i: usize, len: usize| -> String {
        // Deterministic, as random-looking as generated names.
        let alphabet = b"bcdfghjklmnpqrstvwxz2456789";
        let mut x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5bd1_e995;
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                alphabet[(x >> 33) as usize % alphabet.len()] as char
            })
            .collect()
    };
    let mut objects = Vec::with_capacity(services * 2);
    let mut next_endpoint = 0;
    for i in 0..services {
        let ns = format!("team-{:02}", i % 50);
        let name = format!("svc-{i:05}");
        let service_ports: Vec<Value> = (0..ports)
            .map(|p| {
                json!({
                    "name": PORT_NAMES.get(p).map_or_else(|| format!("port-{p}"), |n| (*n).to_owned()),
                    "port": 80 + p,
                    "protocol": "TCP",
                    "targetPort": 8080 + p
                })
            })
            .collect();
        let cluster_ip = ip(96, i);
        objects.push(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "creationTimestamp": "2025-02-11T08:14:03Z",
                "labels": { "app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "bench" },
                "name": name,
                "namespace": ns,
                "resourceVersion": "1",
                "uid": format!("3b0f1c2e-7a51-4b7e-9a1d-{i:012}")
            },
            "spec": {
                "clusterIP": cluster_ip,
                "clusterIPs": [cluster_ip],
                "internalTrafficPolicy": "Cluster",
                "ipFamilies": ["IPv4"],
                "ipFamilyPolicy": "SingleStack",
                "ports": service_ports,
                "selector": { "app.kubernetes.io/name": name },
                "sessionAffinity": "None",
                "type": "ClusterIP"
            },
            "status": { "loadBalancer": {} }
        }));
        let count = endpoints / services + usize::from(i < endpoints % services);
        let replica_set = suffix(i, 10);
        let eps: Vec<Value> = (0..count)
            .map(|_| {
                let k = next_endpoint;
                next_endpoint += 1;
                json!({
                    "addresses": [ip(128, k)],
                    "conditions": { "ready": true, "serving": true, "terminating": false },
                    "nodeName": format!("worker-{}", k % 100),
                    "targetRef": {
                        "kind": "Pod",
                        "name": format!("{name}-{replica_set}-{}", suffix(k + 1_000_000, 5)),
                        "namespace": ns,
                        "uid": format!("c1a4e0b2-5b7e-4a43-9d55-{k:012}")
                    },
                    "zone": format!("zone-{}", k % 3)
                })
            })
            .collect();
        let slice_ports: Vec<Value> = (0..ports)
            .map(|p| {
                json!({
                    "name": PORT_NAMES.get(p).map_or_else(|| format!("port-{p}"), |n| (*n).to_owned()),
                    "port": 8080 + p,
                    "protocol": "TCP"
                })
            })
            .collect();
        objects.push(json!({
            "addressType": "IPv4",
            "apiVersion": "discovery.k8s.io/v1",
            "endpoints": eps,
            "kind": "EndpointSlice",
            "metadata": {
                "creationTimestamp": "2025-02-11T08:14:03Z",
                "generateName": format!("{name}-"),
                "generation": 1,
                "labels": {
                    "app.kubernetes.io/name": name,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    "kubernetes.io/service-name": name
                },
                "name": format!("{name}-{}", suffix(i + 2_000_000, 5)),
                "namespace": ns,
                "ownerReferences": [{
                    "apiVersion": "v1", "blockOwnerDeletion": true, "controller": true,
                    "kind": "Service", "name": name, "uid": format!("3b0f1c2e-7a51-4b7e-9a1d-{i:012}")
                }],
                "resourceVersion": "1",
                "uid": format!("8d2e4f60-1a3b-4c5d-8e9f-{i:012}")
            },
            "ports": slice_ports
        }));
    }
    objects
}
