"""Quick check of the quantised kernel on one GPU: INT8 call, its quantisation, vgen's bf16 kernel, cuDNN.

    python benchmarks/quantized_quick.py

Random bf16 q/k/v at the Wan2.1-1.3B 480p (12 x 128, 32,760 tokens) and 14B 720p (40 x 128, 75,600)
shapes; random block masks (128-token blocks, the same count kept per row) at densities 1.0 and 0.25;
do_bench medians in ms; err_vs_bf16 = ||int8 - bf16 kernel|| / ||bf16 kernel||. The full study is
``benchmarks/paro.py``; this is the 1-minute version for kernel work.
"""

import torch, torch.nn.functional as F, triton
from vgen.attention import BlockMask
from vgen.kernels import block_sparse_attention
from vgen.kernels.quantized import quantized_attention, _quantize_for_kernel
from vgen.kernels.reference import attention_reference
t=lambda f: triton.testing.do_bench(f, warmup=50, rep=300)
for h,s in ((12,32760),(40,75600)):
  q,k,v=(torch.randn(1,s,h,128,device='cuda',dtype=torch.bfloat16) for _ in range(3))
  qt,kt,vt=(x.transpose(1,2) for x in (q,k,v))
  cud=t(lambda: F.scaled_dot_product_attention(qt,kt,vt))
  for d in (1.0,0.25):
    m=-(-s//128); g=torch.rand(1,h,m,m,device='cuda')
    dense=(g.argsort(-1)<max(1,round(d*m)))
    bm=BlockMask.from_dense(dense,(128,128),(s,s))
    o8=quantized_attention(q,k,v,bm); ob=block_sparse_attention(q,k,v,bm)
    err=((o8.float()-ob.float()).norm()/ob.float().norm()).item()
    print(f"h{h} s{s} d{d}: int8 {t(lambda: quantized_attention(q,k,v,bm)):.2f} ms (quantise {t(lambda: _quantize_for_kernel(q,k,v,bm,8)):.2f}) bf16 {t(lambda: block_sparse_attention(q,k,v,bm)):.2f} cudnn {cud:.2f} err_vs_bf16 {err:.2e}", flush=True)
