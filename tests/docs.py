"""Writing test documents of every supported kind, including a real (minimal) PDF built byte by byte."""

from __future__ import annotations

from pathlib import Path


def make_pdf(path: Path, pages: list[str]) -> Path:
    """A valid PDF with one line of Helvetica text per page (ASCII), readable by any PDF reader."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", None,
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET"
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        content = len(objects)
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content} 0 R "
                       "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)
    return path


def make_docx(path: Path, heading: str, paragraphs: list[str]) -> Path:
    from docx import Document

    document = Document()
    document.add_heading(heading, level=1)
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    document.save(path)
    return path


# A small bilingual collection: one fact per file, for retrieval, grounding and the app's /chat API.
DOCS = {
    "zh/早停.md": "# 早停\n\n当验证集损失连续几轮不再下降时，就停止训练，并保留验证损失最低的检查点。",
    "zh/分词.md": "# 中文分词\n\n计算 BLEU 之前，中文句子要先用 jieba 分词，否则整句会被当成一个词。",
    "zh/隐私.md": "# 隐私保护\n\n日志中的邮箱地址和手机号码在保存前要脱敏，用占位符替换。",
    "zh/困惑度.md": "# 困惑度\n\n困惑度等于平均交叉熵损失的指数，数值越低说明模型越不意外。",
    "en/lora.md": "# LoRA\n\nLoRA freezes the base weights and trains two small low-rank matrices.",
    "en/dropout.md": "# Dropout\n\nDropout randomly zeroes activations during training to reduce over-fitting.",
}


def write_docs(folder: Path) -> Path:
    for name, text in DOCS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return folder
