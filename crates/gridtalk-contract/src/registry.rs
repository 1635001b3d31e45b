//! Client for the Confluent Schema Registry REST API, only the one call decoding needs:
//! `GET /schemas/ids/{id}`. Schema ids are immutable in a registry, so a fetched schema is cached
//! for the life of the process and each id is fetched at most once while it succeeds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apache_avro::Schema;

#[derive(Debug, thiserror::Error)]
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
}

impl RegistryError {
    /// Whether retrying the same lookup later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, RegistryError::Unavailable(_))
    }
}

#[derive(serde::Deserialize)]
struct SchemaResponse {
    schema: String,
    #[serde(rename = "schemaType", default)]
    schema_type: Option<String>,
}

/// A caching Schema Registry client. Cheap to clone.
#[derive(Clone)]
pub struct RegistryClient {
    base_url: String,
    http: reqwest::Client,
    basic_auth: Option<(String, String)>,
    cache: Arc<Mutex<HashMap<u32, Arc<Schema>>>>,
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
    pub fn new(base_url: &str, basic_auth: Option<(String, String)>, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .expect("HTTP client with static settings");
        RegistryClient {
            base_url: base_url.trim_end_matches('/').to_string(),
            http,
            basic_auth,
            cache: Arc::default(),
        }
    }

    /// The writer schema registered under `id`.
    pub async fn schema(&self, id: u32) -> Result<Arc<Schema>, RegistryError> {
        if let Some(schema) = self.cache.lock().expect("registry cache").get(&id) {
            return Ok(schema.clone());
        }
        let url = format!("{}/schemas/ids/{id}", self.base_url);
        let mut request = self
            .http
            .get(&url)
            .header("Accept", "application/vnd.schemaregistry.v1+json");
        if let Some((user, password)) = &self.basic_auth {
            request = request.basic_auth(user, Some(password));
        }
        let response = request
            .send()
            .await
            .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(RegistryError::NotFound {
                id,
                url: self.base_url.clone(),
            });
        }
        if !status.is_success() {
            return Err(RegistryError::Unavailable(format!(
                "GET {url} answered {status}"
            )));
        }
        let body: SchemaResponse = response.json().await.map_err(|e| RegistryError::Invalid {
            id,
            detail: e.to_string(),
        })?;
        if let Some(kind) = body.schema_type.as_deref().filter(|k| *k != "AVRO") {
            return Err(RegistryError::Invalid {
                id,
                detail: format!("schemaType {kind} is not AVRO"),
            });
        }
        let schema = Schema::parse_str(&body.schema).map_err(|e| RegistryError::Invalid {
            id,
            detail: e.to_string(),
        })?;
        let schema = Arc::new(schema);
        self.cache
            .lock()
            .expect("registry cache")
            .insert(id, schema.clone());
        Ok(schema)
    }
}
