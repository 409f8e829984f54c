"""OpenAI- and Anthropic-compatible endpoints (`/oai/api/v1/...`, `/anthropic/api/v1/...`).

They run on the SAME samplers as the Tinker API: a request resolves its `model` (a base model or a
`tinker://` path) to a Tinker sampling session through `SamplingService`, submits a sample future and waits
on it. The model's tokenizer and chat template live on the trainer that backs the sampler (pod_api TEXT_*
routes); the gateway itself never loads model files.
"""
