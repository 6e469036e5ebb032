# Experiment for docs/QUALITY.md ("loss-aware masks"), removed after it was measured.
"""Diagonal empirical Fisher of each projection's input: mean over positions of (dL/dx_j)^2,
L the summed next-token NLL of a window, the gradient through that projection alone."""
import json, os, sys, time
import numpy as np, torch
from transformers import AutoModelForCausalLM

model_path, tokens, out, n, ln = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
skip = int(sys.argv[6]) if len(sys.argv) > 6 else 0
torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(model_path)),
        gguf_file=os.path.basename(model_path), dtype=torch.float32)
model.eval()
PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
        "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
acc = {}
rows = [0]
for l, layer in enumerate(model.model.layers):
    for p, path in PROJ.items():
        m = layer.get_submodule(path)
        def hook(_m, gin, _gout, key=(l, p)):
            g = gin[0].detach().double().reshape(-1, gin[0].shape[-1])
            acc[key] = acc.get(key, 0) + (g * g).sum(0)
        m.register_full_backward_hook(hook)
for l, layer in enumerate(model.model.layers):
    def lhook(_m, _gin, gout, key=(l, "resid")):
        g = gout[0].detach().double().reshape(-1, gout[0].shape[-1])
        acc[key] = acc.get(key, 0) + (g * g).sum(0)
        acc[(key[0], "full")] = acc.get((key[0], "full"), 0) + g.T @ g
    layer.register_full_backward_hook(lhook)
c4 = np.load(os.path.join(tokens, "c4.npy")).astype(np.int64)
t0 = time.time()
for w in range(n):
    ids = torch.tensor(c4[skip + w * ln: skip + (w + 1) * ln]).unsqueeze(0)
    logits = model(input_ids=ids).logits[0]
    loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
    model.zero_grad(set_to_none=True)
    loss.backward()
    rows[0] += ln
    print(f"window {w}: loss {loss.item() / (ln - 1):.4f} ({time.time() - t0:.0f}s)", flush=True)
L = len(model.model.layers)
res = {"model": os.path.basename(model_path), "windows": n, "seq_len": ln, "skip": skip,
       "layers": [{p: (acc[(l, p)] / rows[0]).tolist() for p in list(PROJ) + ["resid"]} for l in range(L)]}
json.dump(res, open(out, "w"))
np.save(out.replace(".json", "_full.npy"), np.stack([(acc[(l, "full")] / rows[0]).numpy() for l in range(L)]))
