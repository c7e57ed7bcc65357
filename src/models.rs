//! The provider's model catalogue, fetched at start and refreshed on a schedule. Ingest uses it
//! to fail an item whose model the provider does not serve at once, naming close matches, rather
//! than hours later inside a batch job.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use crate::provider::Provider;

/// The known model ids; empty until the first successful fetch.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    models: Arc<RwLock<Option<BTreeSet<String>>>>,
}

/// The result of checking one model against the catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelCheck {
    Known,
    /// The catalogue has not been fetched, so the model was not checked.
    Unchecked,
    /// Not served; the message names the model and its close matches.
    Unknown(String),
}

impl Catalogue {
    /// Replaces the known models.
    pub fn set(&self, ids: impl IntoIterator<Item = String>) {
        *self.models.write().expect("catalogue lock") = Some(ids.into_iter().collect());
    }

    pub fn len(&self) -> usize {
        self.models
            .read()
            .expect("catalogue lock")
            .as_ref()
            .map_or(0, BTreeSet::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks a model id.
    pub fn check(&self, model: &str) -> ModelCheck {
        let guard = self.models.read().expect("catalogue lock");
        let Some(models) = guard.as_ref() else {
            return ModelCheck::Unchecked;
        };
        if models.contains(model) {
            return ModelCheck::Known;
        }
        let matches = close_matches(model, models.iter().map(String::as_str));
        let hint = if matches.is_empty() {
            "no model in the catalogue has a similar name".to_string()
        } else {
            format!("close matches: {}", matches.join(", "))
        };
        ModelCheck::Unknown(format!(
            "model {model:?} is not in the provider's model list; {hint}"
        ))
    }

    /// Fetches the catalogue once. Returns the number of models, or logs and keeps the old list.
    pub async fn refresh(&self, provider: &Provider) -> Option<usize> {
        match provider.list_models().await {
            Ok(models) => {
                let count = models.len();
                self.set(models.into_iter().map(|m| m.id));
                tracing::debug!(models = count, "model catalogue refreshed");
                Some(count)
            }
            Err(error) => {
                tracing::warn!(%error, "failed to fetch the model catalogue; keeping the previous one");
                None
            }
        }
    }
}

/// Returns up to three catalogue ids most like `model`: same name ignoring case, the same last
/// path segment, or a Jaro-Winkler similarity of at least 0.85.
pub fn close_matches<'a>(model: &str, ids: impl Iterator<Item = &'a str>) -> Vec<String> {
    let requested = model.to_ascii_lowercase();
    let requested_tail = requested
        .rsplit('/')
        .next()
        .unwrap_or(&requested)
        .to_string();
    let mut scored: Vec<(f64, &str)> = ids
        .filter_map(|id| {
            let lower = id.to_ascii_lowercase();
            let tail = lower.rsplit('/').next().unwrap_or(&lower);
            let score = if lower == requested || tail == requested_tail {
                2.0
            } else {
                strsim::jaro_winkler(&requested, &lower)
                    .max(strsim::jaro_winkler(&requested_tail, tail))
            };
            (score >= 0.85).then_some((score, id))
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    scored
        .into_iter()
        .take(3)
        .map(|(_, id)| id.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchecked_until_fetched() {
        assert_eq!(Catalogue::default().check("any"), ModelCheck::Unchecked);
    }

    #[test]
    fn unknown_model_names_close_matches() {
        let catalogue = Catalogue::default();
        catalogue.set([
            "meta-llama/Llama-3.3-70B-Instruct-Turbo".to_string(),
            "BAAI/bge-large-en-v1.5".to_string(),
        ]);
        assert_eq!(
            catalogue.check("meta-llama/Llama-3.3-70B-Instruct-Turbo"),
            ModelCheck::Known
        );
        let ModelCheck::Unknown(message) = catalogue.check("meta-llama/Llama-3.3-70B-Instruct")
        else {
            panic!("expected an unknown model");
        };
        assert!(
            message.contains("\"meta-llama/Llama-3.3-70B-Instruct\""),
            "{message}"
        );
        assert!(
            message.contains("close matches: meta-llama/Llama-3.3-70B-Instruct-Turbo"),
            "{message}"
        );
    }

    #[test]
    fn unrelated_name_has_no_matches() {
        let ids = ["BAAI/bge-large-en-v1.5"];
        assert!(close_matches("gpt-4o", ids.into_iter()).is_empty());
    }
}
