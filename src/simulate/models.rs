//! The model catalogue that `GET /v1/models` returns and that every request's `model` is checked
//! against. The entries are real Together model ids. Their prices, context lengths, output limits
//! and `created` times are approximations of Together's published values, for clients to parse.
//! Each entry also states whether batch jobs accept the model. Together offers no batch inference
//! for `deepseek-ai/DeepSeek-R1` and `deepseek-ai/DeepSeek-V3.1`, so their jobs fail.

use std::sync::RwLock;

use axum::Json;
use serde_json::{Value, json};

/// Kind of request a model serves, as the `type` field of `GET /v1/models` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ModelKind {
    Chat,
    Embedding,
    Image,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Chat => "chat",
            ModelKind::Embedding => "embedding",
            ModelKind::Image => "image",
        }
    }
}

/// One catalogue entry. Prices are US dollars per million tokens (per megapixel for images).
pub(super) struct Model {
    pub id: &'static str,
    pub kind: ModelKind,
    pub display_name: &'static str,
    pub organization: &'static str,
    license: &'static str,
    pub context_length: u32,
    /// Unix seconds.
    pub created: i64,
    pub input_price: f64,
    pub output_price: f64,
    /// Whether batch jobs accept the model.
    pub batchable: bool,
    /// Maximum `max_tokens` of a request; `None` for models that generate no text.
    pub max_output_tokens: Option<u64>,
}

// NOTE: prices, dates and output limits are estimates, so a client should rely on their types only.
const CATALOGUE: &[Model] = &[
    Model {
        id: "meta-llama/Llama-3.3-70B-Instruct-Turbo",
        kind: ModelKind::Chat,
        display_name: "Meta Llama 3.3 70B Instruct Turbo",
        organization: "Meta",
        license: "Llama-3.3",
        context_length: 131_072,
        created: 1_733_443_200,
        input_price: 0.88,
        output_price: 0.88,
        batchable: true,
        max_output_tokens: Some(8_192),
    },
    Model {
        id: "Qwen/Qwen2.5-7B-Instruct-Turbo",
        kind: ModelKind::Chat,
        display_name: "Qwen2.5 7B Instruct Turbo",
        organization: "Qwen",
        license: "apache-2.0",
        context_length: 32_768,
        created: 1_726_617_600,
        input_price: 0.30,
        output_price: 0.30,
        batchable: true,
        max_output_tokens: Some(8_192),
    },
    Model {
        id: "deepseek-ai/DeepSeek-V3.1",
        kind: ModelKind::Chat,
        display_name: "DeepSeek V3.1",
        organization: "DeepSeek",
        license: "mit",
        context_length: 131_072,
        created: 1_755_734_400,
        input_price: 0.60,
        output_price: 1.70,
        batchable: false,
        max_output_tokens: Some(32_768),
    },
    Model {
        id: "deepseek-ai/DeepSeek-R1",
        kind: ModelKind::Chat,
        display_name: "DeepSeek R1",
        organization: "DeepSeek",
        license: "mit",
        context_length: 163_840,
        created: 1_737_331_200,
        input_price: 3.00,
        output_price: 7.00,
        batchable: false,
        max_output_tokens: Some(32_768),
    },
    Model {
        id: "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo",
        kind: ModelKind::Chat,
        display_name: "Meta Llama 3.1 8B Instruct Turbo",
        organization: "Meta",
        license: "Llama-3.1",
        context_length: 131_072,
        created: 1_721_692_800,
        input_price: 0.18,
        output_price: 0.18,
        batchable: true,
        max_output_tokens: Some(8_192),
    },
    Model {
        id: "BAAI/bge-large-en-v1.5",
        kind: ModelKind::Embedding,
        display_name: "BAAI-Bge-Large-1.5",
        organization: "BAAI",
        license: "mit",
        context_length: 512,
        created: 1_695_081_600,
        input_price: 0.02,
        output_price: 0.0,
        batchable: false,
        max_output_tokens: None,
    },
    Model {
        id: "BAAI/bge-base-en-v1.5",
        kind: ModelKind::Embedding,
        display_name: "BAAI-Bge-Base-1.5",
        organization: "BAAI",
        license: "mit",
        context_length: 512,
        created: 1_695_081_600,
        input_price: 0.008,
        output_price: 0.0,
        batchable: false,
        max_output_tokens: None,
    },
    Model {
        id: "black-forest-labs/FLUX.1-schnell",
        kind: ModelKind::Image,
        display_name: "FLUX.1 [schnell]",
        organization: "Black Forest Labs",
        license: "apache-2.0",
        context_length: 0,
        created: 1_722_470_400,
        input_price: 0.0027,
        output_price: 0.0,
        batchable: false,
        max_output_tokens: None,
    },
];

/// Returns every model, in catalogue order.
pub(super) fn all() -> &'static [Model] {
    CATALOGUE
}

/// Models added at run time by [`add_model`], shared by every simulator in the process.
static ADDED: RwLock<Vec<&'static Model>> = RwLock::new(Vec::new());

/// Adds a model to the catalogue, so that a dry run of a user's file can use models the built-in
/// list lacks. `endpoint` decides its kind. It is batchable, with a 4,096-token output limit.
pub fn add_model(id: &str, endpoint: &str) {
    if find(id).is_some() {
        return;
    }
    let kind = match endpoint {
        "/v1/embeddings" => ModelKind::Embedding,
        "/v1/images/generations" => ModelKind::Image,
        _ => ModelKind::Chat,
    };
    // Leaked once per distinct id, so the catalogue can hand out `'static` entries.
    let model: &'static Model = Box::leak(Box::new(Model {
        id: Box::leak(id.to_owned().into_boxed_str()),
        kind,
        display_name: "model added for a dry run",
        organization: "unknown",
        license: "unknown",
        context_length: 32_768,
        created: 1_735_689_600,
        input_price: 0.0,
        output_price: 0.0,
        batchable: true,
        max_output_tokens: (kind == ModelKind::Chat).then_some(4_096),
    }));
    ADDED.write().expect("model list lock").push(model);
}

/// Looks up a model by its exact id.
pub(super) fn find(id: &str) -> Option<&'static Model> {
    CATALOGUE.iter().find(|model| model.id == id).or_else(|| {
        ADDED
            .read()
            .expect("model list lock")
            .iter()
            .copied()
            .find(|model| model.id == id)
    })
}

fn model_json(model: &Model) -> Value {
    json!({
        "id": model.id,
        "object": "model",
        "created": model.created,
        "type": model.kind.as_str(),
        "display_name": model.display_name,
        "organization": model.organization,
        "link": format!("https://huggingface.co/{}", model.id),
        "license": model.license,
        "context_length": model.context_length,
        "max_output_tokens": model.max_output_tokens,
        "batchable": model.batchable,
        "pricing": {
            "hourly": 0.0,
            "input": model.input_price,
            "output": model.output_price,
            "base": 0.0,
            "finetune": 0.0,
        },
    })
}

/// `GET /v1/models`: a bare JSON array, as Together sends it.
pub(super) async fn list_models() -> Json<Value> {
    let added = ADDED.read().expect("model list lock");
    Json(Value::Array(
        CATALOGUE
            .iter()
            .chain(added.iter().copied())
            .map(model_json)
            .collect(),
    ))
}
