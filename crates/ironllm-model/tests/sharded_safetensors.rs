//! A checkpoint split into shards with a `model.safetensors.index.json` loads to the same model as the
//! single file: the tiny Qwen2 fixture is re-sharded on the fly and both produce identical logits.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use ironllm_core::executor::ModelExecutor;
use ironllm_core::outputs::{BlockId, NewRequestData, SchedulerOutput};
use ironllm_core::SamplingParams;
use ironllm_model::loader::{load, LoadOptions};
use ironllm_model::runner::CpuModelRunner;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference/tiny_qwen2")
}

fn first_tokens(dir: PathBuf) -> Vec<u32> {
    let loaded = load(&LoadOptions { model: dir, ..Default::default() }).expect("load");
    let mut runner = CpuModelRunner::new(loaded.model.clone(), 8, 16, 0);
    let prompt: Vec<u32> = (1..40).collect();
    let plan = SchedulerOutput {
        scheduled_new_reqs: vec![NewRequestData {
            req_id: "r".into(),
            prompt_token_ids: prompt.clone(),
            output_token_ids: vec![],
            sampling_params: Arc::new(SamplingParams { logprobs: Some(5), ..SamplingParams::greedy(1) }),
            block_ids: vec![BlockId(0), BlockId(1), BlockId(2)],
            num_computed_tokens: 0,
        }],
        num_scheduled_tokens: vec![("r".into(), prompt.len())],
        total_num_scheduled_tokens: prompt.len(),
        ..Default::default()
    };
    let out = runner.execute_model(&plan).expect("step");
    let lp = out.logprobs[0].as_ref().unwrap()[0].clone();
    let mut v = vec![out.sampled_token_ids[0][0]];
    v.extend(lp.top.iter().map(|t| t.logprob.to_bits()));
    v
}

#[test]
fn sharded_checkpoint_equals_single_file() {
    let src = fixture();
    let dir = std::env::temp_dir().join(format!("ironllm-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    let mut weight_map = HashMap::new();
    for (shard, chunk) in names.chunks(names.len().div_ceil(3)).enumerate() {
        let file = format!("model-{:05}-of-00003.safetensors", shard + 1);
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
            chunk.iter().map(|n| (n.clone(), st.tensor(n).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for n in chunk {
            weight_map.insert(n.clone(), file.clone());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(first_tokens(dir.clone()), first_tokens(src));
    std::fs::remove_dir_all(&dir).ok();
}
