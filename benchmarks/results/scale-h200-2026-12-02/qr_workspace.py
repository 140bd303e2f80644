"""Peak memory of torch.linalg.qr on a tall (n, b) float32 matrix on CUDA, against its own size."""
import torch

for n, b in ((85_842_688, 1), (85_842_688, 4)):
    W = torch.randn(n, b, device="cuda")
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    Q, R = torch.linalg.qr(W)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    print(f"qr of ({n}, {b}) float32: matrix {W.nbytes / 2**30:.2f} GiB, peak above it {extra / 2**30:.2f} GiB")
    del W, Q, R
    torch.cuda.empty_cache()
