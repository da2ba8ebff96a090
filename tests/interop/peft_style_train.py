"""A training script written against PEFT's API. The compat test runs it as is, and again with
only the `from peft import` line changed to `from unipeft.compat import`."""
import torch
from transformers import BertConfig, BertForSequenceClassification

from peft import LoraConfig, PeftModel, TaskType, get_peft_model


def base_model():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=40, num_labels=2, max_position_embeddings=32)
    return BertForSequenceClassification(cfg)


def main(out_dir):
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, lora_dropout=0.1,
                        target_modules=["query", "value"])
    model = get_peft_model(base_model(), config)
    model.print_trainable_parameters()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (16, 8), generator=g)
    labels = (ids[:, 0] % 2).long()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step in range(40):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir)
    model = PeftModel.from_pretrained(base_model(), out_dir).eval()
    merged = model.merge_and_unload()
    with torch.no_grad():
        return loss.item(), merged(input_ids=ids).logits
