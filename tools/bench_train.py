#!/usr/bin/env python3
"""The reference side of `cargo xtask bench train`: the same training step as
`xtuner bench` through PyTorch + transformers + PEFT (+ bitsandbytes for QLoRA), on
the GPU (`--device cuda`, as below) or the CPU (`--device cpu`: everything in f32,
`--threads` threads, peak resident memory instead of the CUDA allocator's).

InternLM2 and Llama have the same arithmetic, so the model is a LlamaForCausalLM of
InternLM2-1.8B's shape with random weights (no download). Prints one JSON line.

Modes, as XTuner and its users run them:
  lora   bf16 base, PEFT LoRA (r, alpha r/4, no dropout) on every linear layer and lm_head
  qlora  NF4 base (double quant, bf16 compute) via bitsandbytes, the same adapters
  full   f32 master weights, bf16 autocast
AdamW (torch defaults, lr 1e-5), global-norm clipping at 1.0, random tokens, labels =
inputs. Model FLOPs per token: PaLM, 6N + 12·L·H·Q·T (4N with a frozen base).
"""
import argparse
import json
import math
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["lora", "qlora", "full"], default="lora")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=92544)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: every core)")
    a = p.parse_args()

    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cpu = a.device == "cpu"
    dev = torch.device(a.device)
    if cpu:
        import os
        torch.set_num_threads(a.threads or os.cpu_count())
        if a.mode == "qlora":
            print(json.dumps({"mode": a.mode, "skipped": "QLoRA needs bitsandbytes on a GPU"}))
            return

    def synchronize():
        if not cpu:
            torch.cuda.synchronize()
    config = LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attention_bias=False,
    )
    config._attn_implementation = "sdpa"
    setup = time.perf_counter()
    # Built (and randomly initialised) on the GPU: on the CPU, 1.8B parameters take tens
    # of seconds of the device's time.
    if a.mode == "full":
        with torch.device(dev):
            model = LlamaForCausalLM(config)
    elif a.mode == "lora":
        with torch.device(dev):
            model = LlamaForCausalLM(config)
        if not cpu:
            model = model.to(dtype=torch.bfloat16)
    else:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            print(json.dumps({"mode": a.mode, "skipped": "bitsandbytes is not installed"}))
            return
        from transformers import BitsAndBytesConfig
        import tempfile
        # Quantization happens at load: save the random bf16 model, load it in 4-bit.
        with tempfile.TemporaryDirectory() as d:
            with torch.device(dev):
                LlamaForCausalLM(config).to(dtype=torch.bfloat16).save_pretrained(d)
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
            model = LlamaForCausalLM.from_pretrained(d, quantization_config=q, torch_dtype=torch.bfloat16, device_map={"": 0})
    # N: the matmul parameters (projections, MLP, lm_head; not the embeddings).
    per_layer = (a.hidden * (a.heads + 2 * a.kv_heads) * (a.hidden // a.heads)
                 + a.hidden * a.hidden + 3 * a.hidden * a.intermediate)
    n = a.layers * per_layer + a.hidden * a.vocab
    if a.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if a.mode != "full":
        from peft import LoraConfig, get_peft_model
        if a.checkpointing:
            model.enable_input_require_grads()
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
        model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=a.lora_r // 4, lora_dropout=0.0,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    synchronize()
    setup_s = time.perf_counter() - setup

    ids = torch.randint(0, a.vocab, (a.batch_size, a.seq_len), device=dev)
    losses = []
    if not cpu:
        torch.cuda.reset_peak_memory_stats()
    start = None
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            synchronize()
            start = time.perf_counter()
        with torch.autocast(a.device, dtype=torch.bfloat16, enabled=(a.mode == "full" and not cpu)):
            # No KV cache in training (transformers builds one unless told not to).
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        losses.append(value if math.isfinite(value) else None)  # JSON has no NaN
    synchronize()
    step_s = (time.perf_counter() - start) / max(a.steps, 1)
    tokens_per_s = a.batch_size * a.seq_len / step_s
    flops = (4 if a.mode != "full" else 6) * n + 12 * a.layers * a.heads * (a.hidden // a.heads) * a.seq_len
    report = {
        "mode": a.mode, "checkpointing": a.checkpointing, "seq_len": a.seq_len, "batch_size": a.batch_size,
        "matmul_params": n, "trainable_params": sum(p.numel() for p in params),
        "flops_per_token": flops, "step_s": step_s, "tokens_per_s": tokens_per_s,
        "tflops": tokens_per_s * flops / 1e12, "losses": losses, "setup_s": setup_s,
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    if cpu:
        import resource
        report["threads"] = torch.get_num_threads()
        # ru_maxrss is in KiB on Linux.
        report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        report["device"] = cpu_name()
    else:
        report["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        report["max_memory_reserved"] = torch.cuda.max_memory_reserved()
        report["device"] = torch.cuda.get_device_name(0)
    print(json.dumps(report))


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "CPU"


if __name__ == "__main__":
    sys.exit(main())
