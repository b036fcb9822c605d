// Async scheduling: feeds the tokens step N sampled into step N + 1's input ids on the device, so step
// N + 1 can be queued before the host has read step N's results.
//
// feed_sampled_tokens(unsigned* token_ids, const unsigned* sampled, const int* pairs, int n)
//   pairs: [n, 2] — (index into token_ids, word index into the sampler's output of step N);
//   grid = ceil(n / 256), block = 256.

extern "C" __global__ void feed_sampled_tokens(unsigned* token_ids, const unsigned* sampled, const int* pairs,
                                               int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) token_ids[pairs[2 * i]] = sampled[pairs[2 * i + 1]];
}
