"""Media: input images and LoRA files fetched safely, outputs encoded and kept until they expire.

Modules: ``fetch`` (SSRF-guarded URL fetcher), ``inputs`` (input image decoding), ``encode``
(output encoding), ``storage`` (media store with expiry), ``lora`` (LoRA download cache).
Nothing here imports torch: the API process uses this package.
"""
