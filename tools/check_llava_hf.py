"""Loads a `convert pth_to_hf --save-format huggingface` export with transformers and
answers questions about pictures with it, greedily, to compare with `xtuner chat
EXPORT --image ...` (same prompt template: internlm2_chat's, built here by hand).

    python tools/check_llava_hf.py EXPORT_DIR "What shape is it?" IMAGE...

Needs torch, transformers (5.x; 4.x reads the same files) and Pillow. Prints, per
image, the answer and the loading report (missing/unexpected keys must be empty).
"""
import sys

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

export, question, images = sys.argv[1], sys.argv[2], sys.argv[3:]
model, info = LlavaForConditionalGeneration.from_pretrained(
    export, output_loading_info=True, dtype=torch.float32)
model.eval()
print("loading:", {k: sorted(v) for k, v in info.items() if k != "error_msgs"})
processor = AutoProcessor.from_pretrained(export)
tokenizer = processor.tokenizer
prompt = (tokenizer.bos_token + "<|im_start|>user\n<image>\n" + question
          + "<|im_end|>\n<|im_start|>assistant\n")
for path in images:
    image = Image.open(path).convert("RGB")
    inputs = processor(images=image, text=prompt, return_tensors="pt",
                       add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:],
                              skip_special_tokens=True)
    print(path, "->", answer.strip())
