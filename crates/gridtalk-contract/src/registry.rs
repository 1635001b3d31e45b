//! Client for the Confluent Schema Registry REST API, only the calls gridtalk needs. Decoding:
//! `GET /schemas/ids/{id}`, and `GET /subjects/{subject}/versions/{version}` for the schemas a
//! schema *references* (Confluent's schema references: a named type defined under another
//! subject). Publishing: `POST /compatibility/subjects/{subject}/versions/latest` (is our schema
//! compatible with what the subject holds), `POST /subjects/{subject}/versions` (register it, or
//! learn its id if it already is) and `POST /subjects/{subject}` (look the id up without
//! registering, for registries where applications may not register).
//!
//! Guarantees:
//! - Schema ids are immutable in a registry, so a fetched schema is cached for the life of the
//!   process and each id is fetched at most once while it succeeds.
//! - An id the registry does not have (or serves as something that is not usable Avro) is
//!   remembered for the negative-cache time: a topic full of records with a bad id costs one
//!   HTTP call per id and period, not one per record. Unavailability (5xx, timeouts) is never
//!   cached: the caller retries it.
//! - References are resolved recursively (at most [`MAX_REFERENCE_DEPTH`] deep, cycles refused)
//!   and inlined where the referencing schema first names them, so the schema decoding uses is
//!   self-contained.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apache_avro::Schema;
use serde_json::Value;

/// How deep references may nest (a schema referencing one that references another …).
pub const MAX_REFERENCE_DEPTH: usize = 16;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered that the id does not exist: the record can never be decoded.
    #[error("schema id {id} is not registered at {url}")]
    NotFound { id: u32, url: String },
    /// The registry returned a schema that is not valid Avro (or not Avro at all).
    #[error("schema id {id} from the registry is not a usable Avro schema: {detail}")]
    Invalid { id: u32, detail: String },
    /// The registry could not be reached or failed; the same call may work later.
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
    /// The registry refused a request about a subject (incompatible schema, not registered,
    /// credentials refused): asking again will not change the answer.
    #[error("schema registry refused: {0}")]
    Refused(String),
}

/// The registry's verdict on a schema for a subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compatibility {
    /// The subject holds no schema yet: anything may be registered.
    NewSubject,
    /// Compatible with the subject's latest version under the subject's compatibility level.
    Compatible,
    /// Not compatible; the registry's reasons, when it gave them.
    Incompatible(Vec<String>),
}

impl RegistryError {
    /// Whether retrying the same lookup later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, RegistryError::Unavailable(_))
    }
}

/// A Confluent error body: `{"error_code": 40401, "message": "Subject 'x' not found."}`.
#[derive(serde::Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    error_code: i64,
    #[serde(default)]
    message: String,
}

/// Confluent's error codes for "subject not found" and "schema not found" (under a subject).
const SUBJECT_NOT_FOUND: i64 = 40401;
const VERSION_NOT_FOUND: i64 = 40402;
const SCHEMA_NOT_FOUND: i64 = 40403;

#[derive(serde::Deserialize)]
struct SchemaResponse {
    schema: String,
    #[serde(rename = "schemaType", default)]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Reference>,
}

/// A Confluent schema reference: the named type `name` is the schema registered as `subject`,
/// `version`.
#[derive(serde::Deserialize, Debug, Clone)]
struct Reference {
    name: String,
    subject: String,
    version: i64,
}

/// A caching Schema Registry client. Cheap to clone.
#[derive(Clone)]
pub struct RegistryClient {
    base_url: String,
    http: reqwest::Client,
    basic_auth: Option<(String, String)>,
    cache: Arc<Mutex<HashMap<u32, Arc<Schema>>>>,
    /// Ids the registry refused (not found, not usable), with when that was learnt.
    refused: Arc<Mutex<HashMap<u32, (Instant, RegistryError)>>>,
    negative_ttl: Duration,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("base_url", &self.base_url)
            .field(
                "basic_auth",
                &self.basic_auth.as_ref().map(|(u, _)| (u, "***")),
            )
            .finish()
    }
}

impl RegistryClient {
    /// A client of the registry at `base_url`; ids it refuses are remembered for `negative_ttl`.
    pub fn new(
        base_url: &str,
        basic_auth: Option<(String, String)>,
        timeout: Duration,
        negative_ttl: Duration,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .expect("HTTP client with static settings");
        RegistryClient {
            base_url: base_url.trim_end_matches('/').to_string(),
            http,
            basic_auth,
            cache: Arc::default(),
            refused: Arc::default(),
            negative_ttl,
        }
    }

    /// The writer schema registered under `id`, its references inlined.
    pub async fn schema(&self, id: u32) -> Result<Arc<Schema>, RegistryError> {
        if let Some(schema) = self.cache.lock().expect("registry cache").get(&id) {
            return Ok(schema.clone());
        }
        {
            let mut refused = self.refused.lock().expect("registry negative cache");
            match refused.get(&id) {
                Some((at, error)) if at.elapsed() < self.negative_ttl => return Err(error.clone()),
                Some(_) => {
                    refused.remove(&id);
                }
                None => {}
            }
        }
        let result = self.fetch(id).await;
        match &result {
            Ok(schema) => {
                self.cache
                    .lock()
                    .expect("registry cache")
                    .insert(id, schema.clone());
            }
            Err(error) if !error.is_retryable() => {
                self.refused
                    .lock()
                    .expect("registry negative cache")
                    .insert(id, (Instant::now(), error.clone()));
            }
            Err(_) => {}
        }
        result
    }

    async fn fetch(&self, id: u32) -> Result<Arc<Schema>, RegistryError> {
        let invalid = |detail: String| RegistryError::Invalid { id, detail };
        let body = self
            .get(&format!("{}/schemas/ids/{id}", self.base_url))
            .await
            .map_err(|e| match e {
                RegistryError::Invalid { detail, .. } => invalid(detail),
                other => other,
            })?
            .ok_or_else(|| RegistryError::NotFound {
                id,
                url: self.base_url.clone(),
            })?;
        check_avro(&body).map_err(invalid)?;
        let mut main: Value = serde_json::from_str(&body.schema)
            .map_err(|e| invalid(format!("schema is not JSON: {e}")))?;
        if !body.references.is_empty() {
            let mut definitions = HashMap::new();
            let mut visiting = HashSet::new();
            self.collect_references(&body.references, 1, &mut visiting, &mut definitions)
                .await
                .map_err(|e| match e {
                    RegistryError::Unavailable(_) | RegistryError::Refused(_) => e,
                    RegistryError::NotFound { .. } | RegistryError::Invalid { .. } => {
                        invalid(e.to_string())
                    }
                })?;
            inline_references(&mut main, None, &mut definitions);
        }
        let schema = crate::schemas::parse_schema(&main).map_err(invalid)?;
        Ok(Arc::new(schema))
    }

    /// Fetches every reference (and theirs) into `definitions`, by the referenced type's name.
    async fn collect_references(
        &self,
        references: &[Reference],
        depth: usize,
        visiting: &mut HashSet<(String, i64)>,
        definitions: &mut HashMap<String, Value>,
    ) -> Result<(), RegistryError> {
        let refused = |detail: String| RegistryError::Invalid { id: 0, detail };
        if depth > MAX_REFERENCE_DEPTH {
            return Err(refused(format!(
                "schema references nest deeper than {MAX_REFERENCE_DEPTH}"
            )));
        }
        for reference in references {
            if definitions.contains_key(&reference.name) {
                continue;
            }
            let key = (reference.subject.clone(), reference.version);
            if !visiting.insert(key.clone()) {
                return Err(refused(format!(
                    "schema references form a cycle through {} version {}",
                    reference.subject, reference.version
                )));
            }
            let url = format!(
                "{}/subjects/{}/versions/{}",
                self.base_url,
                encode_path_segment(&reference.subject),
                reference.version
            );
            let body = self.get(&url).await?.ok_or_else(|| {
                refused(format!(
                    "referenced subject {} version {} is not registered",
                    reference.subject, reference.version
                ))
            })?;
            check_avro(&body).map_err(refused)?;
            let definition: Value = serde_json::from_str(&body.schema)
                .map_err(|e| refused(format!("{}: not JSON: {e}", reference.subject)))?;
            Box::pin(self.collect_references(&body.references, depth + 1, visiting, definitions))
                .await?;
            definitions.insert(reference.name.clone(), definition);
            visiting.remove(&key);
        }
        Ok(())
    }

    /// Whether `schema` (Avro JSON) is compatible with the latest version under `subject`.
    pub async fn compatibility(
        &self,
        subject: &str,
        schema: &str,
    ) -> Result<Compatibility, RegistryError> {
        let url = format!(
            "{}/compatibility/subjects/{}/versions/latest?verbose=true",
            self.base_url,
            encode_path_segment(subject)
        );
        match self.post(&url, schema).await? {
            Posted::Ok(body) => {
                if body.get("is_compatible").and_then(Value::as_bool) == Some(true) {
                    return Ok(Compatibility::Compatible);
                }
                let reasons = body
                    .get("messages")
                    .and_then(Value::as_array)
                    .map(|m| {
                        m.iter()
                            .map(|r| r.as_str().map_or_else(|| r.to_string(), str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(Compatibility::Incompatible(reasons))
            }
            Posted::Error(status, e)
                if status == reqwest::StatusCode::NOT_FOUND
                    && matches!(e.error_code, SUBJECT_NOT_FOUND | VERSION_NOT_FOUND) =>
            {
                Ok(Compatibility::NewSubject)
            }
            Posted::Error(status, e) => Err(refused_or_unavailable(&url, status, e)),
        }
    }

    /// Registers `schema` under `subject` (a no-op returning the existing id if it is already
    /// there) and returns its id. The registry checks compatibility itself and answers 409 when
    /// it is not.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let url = format!(
            "{}/subjects/{}/versions",
            self.base_url,
            encode_path_segment(subject)
        );
        match self.post(&url, schema).await? {
            Posted::Ok(body) => schema_id_of(&url, &body),
            Posted::Error(status, e) => Err(refused_or_unavailable(&url, status, e)),
        }
    }

    /// The id of `schema` under `subject` if it is registered there, without registering it.
    pub async fn lookup(&self, subject: &str, schema: &str) -> Result<Option<u32>, RegistryError> {
        let url = format!(
            "{}/subjects/{}",
            self.base_url,
            encode_path_segment(subject)
        );
        match self.post(&url, schema).await? {
            Posted::Ok(body) => schema_id_of(&url, &body).map(Some),
            Posted::Error(status, e)
                if status == reqwest::StatusCode::NOT_FOUND
                    && matches!(e.error_code, SUBJECT_NOT_FOUND | SCHEMA_NOT_FOUND) =>
            {
                Ok(None)
            }
            Posted::Error(status, e) => Err(refused_or_unavailable(&url, status, e)),
        }
    }

    /// POSTs an Avro schema as Confluent's `{"schema": "…"}` body.
    async fn post(&self, url: &str, schema: &str) -> Result<Posted, RegistryError> {
        let request = self
            .http
            .post(url)
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .body(serde_json::json!({ "schema": schema }).to_string());
        let response = self.send(request).await?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| RegistryError::Unavailable(format!("POST {url}: {e}")))?;
        if status.is_success() {
            let body = serde_json::from_str(&text).map_err(|e| {
                RegistryError::Unavailable(format!(
                    "POST {url} answered {status} with no JSON: {e}"
                ))
            })?;
            Ok(Posted::Ok(body))
        } else {
            let mut error: ErrorBody = serde_json::from_str(&text).unwrap_or_default();
            if error.message.is_empty() {
                error.message = text.chars().take(200).collect();
            }
            Ok(Posted::Error(status, error))
        }
    }

    /// Sends `request` with the registry's media type and credentials; a failure to get any
    /// answer is unavailability.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut request = request.header("Accept", "application/vnd.schemaregistry.v1+json");
        if let Some((user, password)) = &self.basic_auth {
            request = request.basic_auth(user, Some(password));
        }
        request
            .send()
            .await
            .map_err(|e| RegistryError::Unavailable(e.to_string()))
    }

    /// GET a registry resource: `Ok(None)` when the registry answers 404.
    async fn get(&self, url: &str) -> Result<Option<SchemaResponse>, RegistryError> {
        let response = self.send(self.http.get(url)).await?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(RegistryError::Unavailable(format!(
                "GET {url} answered {status}"
            )));
        }
        response
            .json()
            .await
            .map(Some)
            .map_err(|e| RegistryError::Invalid {
                id: 0,
                detail: format!("GET {url}: {e}"),
            })
    }
}

/// What a POST answered: a JSON body, or an error status with Confluent's error body.
enum Posted {
    Ok(Value),
    Error(reqwest::StatusCode, ErrorBody),
}

fn schema_id_of(url: &str, body: &Value) -> Result<u32, RegistryError> {
    body.get("id")
        .and_then(Value::as_u64)
        .and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| RegistryError::Unavailable(format!("POST {url} answered no schema id")))
}

/// A registry's error answer: server errors and throttling may pass, the rest is its verdict.
fn refused_or_unavailable(url: &str, status: reqwest::StatusCode, e: ErrorBody) -> RegistryError {
    let detail = format!(
        "POST {url} answered {status} (error {}): {}",
        e.error_code, e.message
    );
    if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        RegistryError::Unavailable(detail)
    } else {
        RegistryError::Refused(detail)
    }
}

fn check_avro(body: &SchemaResponse) -> Result<(), String> {
    match body.schema_type.as_deref() {
        None | Some("AVRO") => Ok(()),
        Some(kind) => Err(format!("schemaType {kind} is not AVRO")),
    }
}

/// A subject name as one URL path segment (subjects may hold `/`, `:` and other reserved
/// characters).
fn encode_path_segment(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// Replaces the first mention of each referenced type (a name string, qualified with the
/// namespace that applies there) with its definition, named by its full name so it means the same
/// wherever it lands; later mentions stay names. Definitions are inlined recursively.
fn inline_references(
    schema: &mut Value,
    namespace: Option<&str>,
    definitions: &mut HashMap<String, Value>,
) {
    match schema {
        Value::String(name) => {
            let full = if name.contains('.') {
                name.clone()
            } else {
                match namespace {
                    Some(ns) if !ns.is_empty() => format!("{ns}.{name}"),
                    _ => name.clone(),
                }
            };
            let key = if definitions.contains_key(&full) {
                Some(full)
            } else if definitions.contains_key(name.as_str()) {
                Some(name.clone())
            } else {
                None
            };
            if let Some(mut definition) = key.and_then(|k| definitions.remove(&k)) {
                let (own, inner) = full_name_of(&definition, None);
                if let Value::Object(attributes) = &mut definition {
                    attributes.insert("name".into(), Value::String(own.clone()));
                    attributes.remove("namespace");
                }
                inline_children(&mut definition, inner.as_deref(), definitions);
                *schema = definition;
            }
        }
        Value::Array(branches) => {
            for branch in branches {
                inline_references(branch, namespace, definitions);
            }
        }
        Value::Object(_) => {
            let (_, inner) = full_name_of(schema, namespace);
            let inner = inner.or_else(|| namespace.map(str::to_string));
            inline_children(schema, inner.as_deref(), definitions);
        }
        _ => {}
    }
}

/// The full name of a named type's definition and the namespace its children are read in.
fn full_name_of(definition: &Value, enclosing: Option<&str>) -> (String, Option<String>) {
    let name = definition
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let full = if name.contains('.') {
        name.to_string()
    } else {
        match definition
            .get("namespace")
            .and_then(Value::as_str)
            .or(enclosing)
        {
            Some(ns) if !ns.is_empty() => format!("{ns}.{name}"),
            _ => name.to_string(),
        }
    };
    let inner = if name.is_empty() {
        None
    } else {
        Some(
            full.rsplit_once('.')
                .map(|(ns, _)| ns.to_string())
                .unwrap_or_default(),
        )
    };
    (full, inner)
}

fn inline_children(
    schema: &mut Value,
    namespace: Option<&str>,
    definitions: &mut HashMap<String, Value>,
) {
    let Value::Object(attributes) = schema else {
        return;
    };
    if let Some(fields) = attributes.get_mut("fields").and_then(Value::as_array_mut) {
        for field in fields {
            if let Some(field_type) = field.get_mut("type") {
                inline_references(field_type, namespace, definitions);
            }
        }
    }
    for key in ["items", "values"] {
        if let Some(inner) = attributes.get_mut(key) {
            inline_references(inner, namespace, definitions);
        }
    }
    if let Some(inner @ (Value::Object(_) | Value::Array(_))) = attributes.get_mut("type") {
        inline_references(inner, namespace, definitions);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_are_inlined_at_their_first_mention_under_their_full_name() {
        let mut main = json!({"type": "record", "name": "Order", "namespace": "com.acme", "fields": [
            {"name": "total", "type": "Money"},
            {"name": "refund", "type": ["null", "com.acme.Money"]},
            {"name": "lines", "type": {"type": "array", "items": "shared.Line"}}
        ]});
        let mut definitions = HashMap::from([
            (
                "com.acme.Money".to_string(),
                json!({"type": "record", "name": "Money", "namespace": "com.acme", "fields": [
                    {"name": "amount", "type": "string"},
                    {"name": "currency", "type": {"type": "enum", "name": "Currency", "symbols": ["EUR"]}}
                ]}),
            ),
            (
                "shared.Line".to_string(),
                json!({"type": "record", "name": "shared.Line", "fields": [
                    {"name": "price", "type": "com.acme.Money"}
                ]}),
            ),
        ]);
        inline_references(&mut main, None, &mut definitions);
        assert!(definitions.is_empty());
        let schema = Schema::parse(&main).expect("self-contained");
        let form = crate::parsing_canonical_form(&serde_json::to_value(&schema).unwrap()).unwrap();
        assert_eq!(
            form,
            concat!(
                r#"{"name":"com.acme.Order","type":"record","fields":["#,
                r#"{"name":"total","type":{"name":"com.acme.Money","type":"record","fields":["#,
                r#"{"name":"amount","type":"string"},"#,
                r#"{"name":"currency","type":{"name":"com.acme.Currency","type":"enum","symbols":["EUR"]}}]}},"#,
                r#"{"name":"refund","type":["null","com.acme.Money"]},"#,
                r#"{"name":"lines","type":{"type":"array","items":{"name":"shared.Line","type":"record","fields":["#,
                r#"{"name":"price","type":"com.acme.Money"}]}}}]}"#
            )
        );
    }

    #[test]
    fn subjects_are_encoded_as_one_path_segment() {
        assert_eq!(encode_path_segment("orders-value"), "orders-value");
        assert_eq!(encode_path_segment("a/b:c d"), "a%2Fb%3Ac%20d");
    }
}
