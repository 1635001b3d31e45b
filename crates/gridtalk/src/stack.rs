//! The embedded stack the `demo` and `bench` commands share: an in-process broker, the WhatsApp
//! sandbox, the demo directory and a configuration pointing at them, with the input topics
//! created. Only in builds with the `demo` feature.

use std::path::PathBuf;
use std::sync::Arc;

use gridtalk_config::Config;
use gridtalk_kafka::TopicSpec;
use gridtalk_sandbox::{Sandbox, SandboxConfig};
use tokio_util::sync::CancellationToken;

const DIRECTORY: &str = include_str!("../../../deploy/demo/directory.toml");
const PHONE_NUMBER_ID: &str = "106540352242922";
const TOKEN: &str = "sandbox-token";
/// Partitions of every topic of the embedded stack.
const PARTITIONS: i32 = 3;

/// Partners of the demo directory, for the traffic generator.
pub const PARTNERS: [&str; 3] = ["ACME", "GLOBEX", "INITECH"];
/// The business whose number sends (the buyer in the sample traffic).
const BUSINESS_NAME: &str = "Northwind Retail";

pub struct EmbeddedStack {
    pub bootstrap: String,
    pub sandbox: Sandbox,
    pub config: Arc<Config>,
    pub directory_file: PathBuf,
    work_dir: PathBuf,
}

impl EmbeddedStack {
    /// The URL of the ingest stage's webhook endpoint (served when the ingest stage runs).
    pub fn webhook_url(&self) -> String {
        format!(
            "http://{}{}",
            self.config.ingest.listen, self.config.ingest.path
        )
    }

    /// Starts the broker and the sandbox (on `sandbox_port`, 0 for any), adjusted by `sandbox`;
    /// `overrides` are extra configuration keys (`SEND__MAX_MESSAGES_PER_SECOND`, …).
    pub async fn start(
        name: &str,
        sandbox_port: u16,
        sandbox: impl FnOnce(&mut SandboxConfig),
        overrides: Vec<(&'static str, String)>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let bootstrap = gridtalk_embedded::start_broker(gridtalk_embedded::free_port()?).await?;
        let work_dir = std::env::temp_dir().join(format!("gridtalk-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&work_dir)?;
        let directory_file = work_dir.join("directory.toml");
        std::fs::write(&directory_file, DIRECTORY)?;

        let defaults = Config::load(
            None,
            [(
                "GRIDTALK__SEND__ACCESS_TOKEN".to_string(),
                TOKEN.to_string(),
            )],
        )?;
        let mut sandbox_config = SandboxConfig {
            phone_number_ids: vec![PHONE_NUMBER_ID.into()],
            valid_tokens: vec![TOKEN.into()],
            templates: gridtalk_sandbox::templates_from_config(&defaults.templates),
            business_name: BUSINESS_NAME.into(),
            people: gridtalk_sandbox::people_from_directory(DIRECTORY, BUSINESS_NAME)
                .map_err(anyhow::Error::msg)?,
            ..SandboxConfig::default()
        };
        sandbox(&mut sandbox_config);
        let sandbox = Sandbox::start(
            sandbox_config,
            ([127, 0, 0, 1], sandbox_port).into(),
            shutdown,
        )
        .await?;
        // A WhatsApp group the operator created earlier (`gridtalk groups create`), which three
        // people joined by its invite link: the daily summaries go there too.
        let group = sandbox
            .create_group(PHONE_NUMBER_ID, "Operations room")
            .map_err(anyhow::Error::msg)?;
        for member in ["14155550106", "14155550101", "14155550103"] {
            sandbox
                .join_group(&group.id, member)
                .await
                .map_err(anyhow::Error::msg)?;
        }
        std::fs::write(
            &directory_file,
            format!(
                "{DIRECTORY}\n[[contacts]]\nid = \"ops-room\"\nname = \"Operations room\"\nwhatsapp_group_id = \"{}\"\nopted_in = true\nroles = [\"operations\"]\n",
                group.id
            ),
        )?;

        // The ingest stage's endpoint; the sandbox posts its signed webhooks there when asked to.
        let ingest_port = gridtalk_embedded::free_port()?;
        let mut settings = vec![
            ("INGEST__LISTEN", format!("127.0.0.1:{ingest_port}")),
            ("INGEST__VERIFY_TOKEN", "sandbox-verify-token".into()),
            (
                "ROUTE__BUTTON_SECRET",
                "demo-button-secret-not-for-production".into(),
            ),
            ("INGEST__APP_SECRET", SandboxConfig::default().app_secret),
            ("KAFKA__BOOTSTRAP_SERVERS", bootstrap.clone()),
            // The embedded broker answers a fetch from inside a record batch with the next batch;
            // one record per batch keeps every committed offset a batch start, so replays resume
            // exactly there.
            ("KAFKA__PRODUCER", "{\"batch.num.messages\" = \"1\"}".into()),
            ("TOPICS__PARTITIONS", PARTITIONS.to_string()),
            ("SEND__API_BASE_URL", sandbox.base_url()),
            ("SEND__PHONE_NUMBER_ID", PHONE_NUMBER_ID.into()),
            ("SEND__ACCESS_TOKEN", TOKEN.into()),
            // The send stage compares its templates with the sandbox's catalogue at start.
            (
                "SEND__BUSINESS_ACCOUNT_ID",
                SandboxConfig::default().business_account_id,
            ),
            ("DIRECTORY__FILE", directory_file.display().to_string()),
            ("ADMIN__LOG_FORMAT", "text".into()),
        ];
        settings.extend(overrides);
        let config = Arc::new(Config::load(
            None,
            settings
                .iter()
                .map(|(k, v)| (format!("GRIDTALK__{k}"), v.clone())),
        )?);
        let inputs: Vec<TopicSpec> = config
            .topics
            .inputs
            .iter()
            .map(|t| TopicSpec {
                name: t.clone(),
                partitions: PARTITIONS,
                configs: vec![],
            })
            .collect();
        gridtalk_kafka::ensure_topics(&config.kafka, &inputs).await?;
        Ok(EmbeddedStack {
            bootstrap,
            sandbox,
            config,
            directory_file,
            work_dir,
        })
    }
}

impl Drop for EmbeddedStack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}
