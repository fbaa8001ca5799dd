"""Demo and test tools, not part of the installed library: `python -m demo` (what `make demo` runs), a local S3 server
(`demo.seaweed`) and generated document files (`demo.samples`)."""
