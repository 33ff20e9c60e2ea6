"""Vision-language models for the edge: HiRED token dropping, a LLaVA-Next plug-in, the zoo VLM."""
