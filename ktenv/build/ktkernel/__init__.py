"""kt-kernel matched to the CPU: variants (which one a CPU gets), verify (what the env loads), source (a build from a checkout), install (the build pipeline step)."""
