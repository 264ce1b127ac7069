"""Quick GPU probe: a few paged steps per dtype against the oracle; prints each failure's last lines."""
import traceback

import torch

from paged import CacheSpec, PagedKVCache
from oracle import ContiguousOracle
from conformance.policy import compare

for dt in (torch.bfloat16, torch.float16, torch.float32):
    for D, P in ((64, 16), (128, 64)):
        try:
            spec = CacheSpec(num_layers=1, num_kv_heads=2, head_dim=D, page_size=P, num_pages=64, max_seq_len=512,
                             dtype=dt, device="cuda")
            c, g, r = PagedKVCache(spec, policy="random"), ContiguousOracle(spec), ContiguousOracle(spec, compute_dtype=dt)
            for x in (c, g, r):
                x.admit(0); x.admit(1)
            for qls in ([40, 3], [1, 1], [1, 17]):
                for x in (c, g, r):
                    x.plan([0, 1], qls)
                q = torch.randn(2, max(qls), 8, D, device="cuda", dtype=dt)
                k = torch.randn(2, max(qls), 2, D, device="cuda", dtype=dt)
                v = torch.randn_like(k)
                a, b, rr = c.run(0, q, k, v), g.run(0, q, k, v), r.run(0, q, k, v)
                res = [compare(a[i, :n], b[i, :n], rr[i, :n], dt) for i, n in enumerate(qls)]
                print(dt, D, P, qls, all(x.ok for x in res), max(x.error for x in res))
        except Exception as exc:  # noqa: BLE001
            print("FAIL", dt, D, P, type(exc).__name__, str(exc)[:700].replace("\n", " | "))
