//! Kafka client settings, built once from the typed configuration.
//!
//! Secrets (the SASL password, the TLS key password) come from the configuration's
//! environment-sourced [`Secret`](tally_core::config::Secret) values or from files named in it;
//! they are read here, at start-up, handed to librdkafka, and never logged: the [`Debug`] of
//! [`KafkaClients`] shows the property names only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tally_core::config::{KafkaConfig, Secret};

/// Why Kafka could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    /// A setting is missing or wrong.
    #[error("kafka configuration: {0}")]
    Config(String),
    /// A file (a secret, Tally's own offsets) could not be read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// librdkafka refused the settings or the cluster answered with an error.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// The properties every Tally client starts from (brokers, client id, security, pass-through
/// properties).
#[derive(Clone)]
pub struct KafkaClients {
    properties: BTreeMap<String, String>,
    /// Names of properties whose values are secret.
    secret_names: Vec<&'static str>,
}

impl std::fmt::Debug for KafkaClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaClients")
            .field("properties", &self.properties.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn read_secret(
    value: &Option<Secret>,
    file: &Option<PathBuf>,
    name: &str,
) -> Result<Option<String>, KafkaSetupError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(KafkaSetupError::Config(format!(
            "give {name} or {name}_file, not both"
        ))),
        (Some(secret), None) => Ok(Some(secret.0.clone())),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|s| Some(s.trim_end_matches(['\n', '\r']).to_owned()))
            .map_err(|source| KafkaSetupError::File {
                path: path.clone(),
                source,
            }),
        (None, None) => Ok(None),
    }
}

fn path_string(path: &Path) -> String {
    path.display().to_string()
}

impl KafkaClients {
    /// Settings for `config`; an error names what is wrong. Reads the secret files.
    pub fn new(config: &KafkaConfig) -> Result<Self, KafkaSetupError> {
        if config.brokers.trim().is_empty() {
            return Err(KafkaSetupError::Config(
                "kafka.brokers is empty; name the bootstrap servers (host:port,...)".into(),
            ));
        }
        let mut properties = BTreeMap::new();
        properties.insert("bootstrap.servers".to_owned(), config.brokers.clone());
        properties.insert("client.id".to_owned(), config.client_id.clone());
        let security = &config.security;
        if let Some(protocol) = &security.protocol {
            let protocol = protocol.to_ascii_lowercase();
            if !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&protocol.as_str()) {
                return Err(KafkaSetupError::Config(format!(
                    "kafka.security.protocol must be plaintext, ssl, sasl_plaintext or sasl_ssl, not {protocol:?}"
                )));
            }
            properties.insert("security.protocol".to_owned(), protocol);
        }
        if let Some(mechanism) = &security.sasl_mechanism {
            let mechanism = mechanism.to_ascii_uppercase();
            if !["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"].contains(&mechanism.as_str()) {
                return Err(KafkaSetupError::Config(format!(
                    "kafka.security.sasl_mechanism must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, not {mechanism:?}"
                )));
            }
            properties.insert("sasl.mechanism".to_owned(), mechanism);
        }
        if let Some(user) = &security.sasl_username {
            properties.insert("sasl.username".to_owned(), user.clone());
        }
        let mut secret_names = Vec::new();
        if let Some(password) = read_secret(
            &security.sasl_password,
            &security.sasl_password_file,
            "sasl_password",
        )? {
            properties.insert("sasl.password".to_owned(), password);
            secret_names.push("sasl.password");
        }
        for (name, path) in [
            ("ssl.ca.location", &security.ssl_ca_location),
            ("ssl.certificate.location", &security.ssl_certificate_location),
            ("ssl.key.location", &security.ssl_key_location),
        ] {
            if let Some(path) = path {
                properties.insert(name.to_owned(), path_string(path));
            }
        }
        if let Some(password) = read_secret(
            &security.ssl_key_password,
            &security.ssl_key_password_file,
            "ssl_key_password",
        )? {
            properties.insert("ssl.key.password".to_owned(), password);
            secret_names.push("ssl.key.password");
        }
        for (name, value) in &config.properties {
            properties.insert(name.clone(), value.clone());
        }
        let clients = Self {
            properties,
            secret_names,
        };
        // librdkafka checks names and values when a configuration is made: a typo fails here.
        // Its message quotes the value, which may be a secret: only the property is named.
        clients.config().create_native_config().map_err(|e| match e {
            KafkaError::ClientConfig(_, _, name, _) => {
                KafkaSetupError::Config(format!("librdkafka refused the property {name:?} or its value"))
            }
            other => KafkaSetupError::Kafka(other),
        })?;
        Ok(clients)
    }

    /// A client configuration with these settings, for further settings and `create`.
    pub fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (name, value) in &self.properties {
            config.set(name, value);
        }
        config
    }

    /// Whether `name` is one of the secret properties (never logged).
    pub fn is_secret(&self, name: &str) -> bool {
        self.secret_names.contains(&name)
    }

    /// An admin client.
    pub fn admin(&self) -> Result<AdminClient<DefaultClientContext>, KafkaSetupError> {
        Ok(self.config().create()?)
    }
}

/// Creates `topic` unless it exists. `replication_factor` -1 takes the broker's default.
pub async fn ensure_topic(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    partitions: i32,
    replication_factor: i32,
) -> Result<(), KafkaSetupError> {
    let new = NewTopic::new(
        topic,
        partitions.max(1),
        TopicReplication::Fixed(replication_factor),
    );
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics([&new], &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaSetupError::Config(format!(
                    "cannot create topic {name}: {code}"
                )));
            }
        }
    }
    Ok(())
}

/// Replaces every character Kafka does not allow in a topic name with `_` and keeps the name
/// within Kafka's 249 characters.
pub fn topic_name(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(249);
    if name.is_empty() || name == "." || name == ".." {
        name = format!("_{name}");
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_keep_what_kafka_allows() {
        assert_eq!(
            topic_name("tally.out.abc.page views/2"),
            "tally.out.abc.page_views_2"
        );
        assert_eq!(topic_name("é"), "_");
        assert_eq!(topic_name(".."), "_..");
        assert_eq!(topic_name(&"x".repeat(300)).len(), 249);
    }

    #[test]
    fn settings_are_checked_and_secrets_not_shown() {
        let mut config = KafkaConfig::default();
        assert!(matches!(
            KafkaClients::new(&config),
            Err(KafkaSetupError::Config(_))
        ));
        config.brokers = "127.0.0.1:1".into();
        config.security.protocol = Some("sasl_plaintext".into());
        config.security.sasl_mechanism = Some("scram-sha-512".into());
        config.security.sasl_username = Some("tally".into());
        config.security.sasl_password = Some(Secret("hunter2".into()));
        let clients = KafkaClients::new(&config).unwrap();
        assert!(clients.is_secret("sasl.password"));
        assert!(!format!("{clients:?}").contains("hunter2"));
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(clients.config().get("sasl.mechanism"), Some("SCRAM-SHA-512"));

        config.security.sasl_password_file = Some("/nonexistent".into());
        assert!(matches!(
            KafkaClients::new(&config),
            Err(KafkaSetupError::Config(_))
        ));
        config.security.sasl_password = None;
        assert!(matches!(
            KafkaClients::new(&config),
            Err(KafkaSetupError::File { .. })
        ));

        let mut config = KafkaConfig {
            brokers: "127.0.0.1:1".into(),
            ..KafkaConfig::default()
        };
        config.security.protocol = Some("carrier-pigeon".into());
        assert!(matches!(
            KafkaClients::new(&config),
            Err(KafkaSetupError::Config(_))
        ));
        config.security.protocol = None;
        config
            .properties
            .insert("no.such.property".into(), "s3cret".into());
        let refused = KafkaClients::new(&config).unwrap_err().to_string();
        assert!(
            refused.contains("no.such.property") && !refused.contains("s3cret"),
            "{refused}"
        );
    }
}
