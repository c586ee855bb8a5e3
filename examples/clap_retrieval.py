"""Text-audio retrieval with AF-CLAP embeddings: index a folder of clips, rank them for text queries, and rank
captions for every clip (the reverse direction).

    python examples/clap_retrieval.py CLIP_FOLDER --model ./afclap-hf --query "a dog barking" "rain on a window"
    python examples/clap_retrieval.py CLIP_FOLDER --model ./afclap-hf --captions "speech" "music" "a siren"

Embeddings are L2-normalised, so a similarity is a dot product (cosine). ``--save-index`` writes the clip
embeddings and paths (safetensors) for reuse with ``--load-index``.
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor

import af2_hf  # noqa: F401  (registers AF-CLAP with the Auto classes)

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif"}


def list_clips(folder: Path) -> list[Path]:
    clips = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not clips:
        raise SystemExit(f"No audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) under {folder}.")
    return clips


@torch.inference_mode()
def embed_clips(model, processor, clips: list[Path], batch_size: int) -> torch.Tensor:
    chunks = []
    for start in range(0, len(clips), batch_size):
        batch = [str(p) for p in clips[start : start + batch_size]]
        inputs = processor(audio=batch).to(model.device)
        chunks.append(model.get_audio_features(**inputs).pooler_output.float().cpu())
    return torch.cat(chunks)


@torch.inference_mode()
def embed_texts(model, processor, texts: list[str]) -> torch.Tensor:
    inputs = processor(text=texts).to(model.device)
    return model.get_text_features(**inputs).pooler_output.float().cpu()


def build_or_load_index(args, model, processor) -> tuple[list[str], torch.Tensor]:
    if args.load_index:
        tensors = load_file(args.load_index)
        paths = json.loads(Path(args.load_index).with_suffix(".json").read_text(encoding="utf-8"))
        return paths, tensors["audio_embeds"]
    clips = list_clips(Path(args.folder))
    embeds = embed_clips(model, processor, clips, args.batch_size)
    paths = [str(p) for p in clips]
    if args.save_index:
        save_file({"audio_embeds": embeds.contiguous()}, args.save_index)
        Path(args.save_index).with_suffix(".json").write_text(json.dumps(paths), encoding="utf-8")
    return paths, embeds


def print_ranking(title: str, names: list[str], scores: torch.Tensor, top_k: int) -> None:
    print(title)
    values, order = scores.topk(min(top_k, len(names)))
    for value, index in zip(values.tolist(), order.tolist()):
        print(f"  {value:+.4f}  {names[index]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", help="folder of clips to index (searched recursively)")
    parser.add_argument("--model", required=True, help="converted AF-CLAP folder or Hub repo")
    parser.add_argument("--query", nargs="*", default=[], help="text queries: rank the clips for each")
    parser.add_argument("--captions", nargs="*", default=[], help="candidate captions: rank them for each clip")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="clips per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--save-index", default=None, help="write the clip embeddings to this .safetensors file")
    parser.add_argument("--load-index", default=None, help="use an index written by --save-index instead of a folder")
    args = parser.parse_args()
    if not args.folder and not args.load_index:
        parser.error("give a folder of clips or --load-index")
    if not args.query and not args.captions:
        parser.error("give --query texts (text -> audio) and/or --captions (audio -> text)")

    model = AutoModel.from_pretrained(args.model).to(args.device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    paths, audio_embeds = build_or_load_index(args, model, processor)
    print(f"{len(paths)} clip(s) indexed.")
    if args.query:
        similarity = embed_texts(model, processor, args.query) @ audio_embeds.T  # (queries, clips)
        for query, scores in zip(args.query, similarity):
            print_ranking(f"query {query!r}:", paths, scores, args.top_k)
    if args.captions:
        similarity = audio_embeds @ embed_texts(model, processor, args.captions).T  # (clips, captions)
        for path, scores in zip(paths, similarity):
            print_ranking(f"clip {path}:", args.captions, scores, args.top_k)


if __name__ == "__main__":
    main()
