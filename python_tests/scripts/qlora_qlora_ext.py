"""A QLoRA fine-tune as a bitsandbytes + PEFT user writes it (transformers Trainer or TRL SFTTrainer).

python_tests/scripts/qlora_qlora_ext.py is python_tests/scripts/qlora_bitsandbytes.py with two lines changed
(the import and the quantization config line); python_tests/test_peft_interop.py checks that and runs both.

    python qlora_bitsandbytes.py MODEL_DIR OUTPUT_DIR [--trainer trainer|sft|sft-wrapped] [--steps 5]
"""
import argparse
import json

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                          TrainingArguments)
from trl import SFTConfig, SFTTrainer
import qlora_ext

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("output_dir")
parser.add_argument("--trainer", choices=["trainer", "sft", "sft-wrapped"], default="trainer")
parser.add_argument("--steps", type=int, default=5)
args = parser.parse_args()

torch.manual_seed(0)
bnb_config = qlora_ext.QLoRAConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=bnb_config, device_map={"": "cpu"})
tokenizer = AutoTokenizer.from_pretrained(args.model)
model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
lora_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")

texts = [f"Q: what comes after {w}? A: {w} {w} {w}." for w in ["red", "blue", "green", "gold"]] * 8
dataset = Dataset.from_dict({"text": texts})
common = dict(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=3e-3,
              lr_scheduler_type="constant", logging_steps=1, optim="paged_adamw_8bit", gradient_checkpointing=True,
              gradient_checkpointing_kwargs={"use_reentrant": False}, save_strategy="no", report_to="none",
              use_cpu=True, seed=0)

if args.trainer == "trainer":
    model = get_peft_model(model, lora_config)
    model.print_trainable_parameters()
    tokenized = dataset.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
    trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=tokenized,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
elif args.trainer == "sft":
    trainer = SFTTrainer(model=model, args=SFTConfig(**common, max_length=64), train_dataset=dataset,
                         processing_class=tokenizer, peft_config=lora_config)
else:  # a model the user already wrapped with get_peft_model
    model = get_peft_model(model, lora_config)
    trainer = SFTTrainer(model=model, args=SFTConfig(**common, max_length=64), train_dataset=dataset,
                         processing_class=tokenizer)

trainer.train()
trainer.model.save_pretrained(args.output_dir)
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
print(json.dumps({"losses": losses}))
with open(f"{args.output_dir}/losses.json", "w") as f:
    json.dump(losses, f)
