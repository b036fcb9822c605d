// Structured output: applies per-row token bitmasks to f32 logits before sampling (vLLM applies the
// grammar's bitmask to the logits the sampler then sees, logprobs included).
//
// apply_token_bitmask_f32(float* logits, int vocab, const unsigned* masks, const int* rows, int words)
//   masks: [num_masked_rows, words] — bit (t % 32) of word t / 32 set when token t is allowed;
//   rows:  [num_masked_rows] — the logits row each mask applies to.
//   grid = (num_masked_rows, ceil(vocab / 1024)), block = 256 (each thread 4 tokens).

extern "C" __global__ void apply_token_bitmask_f32(float* logits, int vocab, const unsigned* masks, const int* rows,
                                                   int words) {
    const int r = blockIdx.x;
    const long long row = rows[r];
    const unsigned* m = masks + (long long)r * words;
    const int base = blockIdx.y * 1024;
    for (int i = threadIdx.x; i < 1024; i += blockDim.x) {
        const int t = base + i;
        if (t < vocab && ((m[t >> 5] >> (t & 31)) & 1u) == 0u) logits[row * vocab + t] = -IRONLLM_INF;
    }
}
