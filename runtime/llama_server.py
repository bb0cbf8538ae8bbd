"""llama-cpp-python's OpenAI-compatible server, with llama.cpp's best CPU variant loaded first.

    python -m edgekd.runtime.llama_server --model model.gguf --clip_model_path mmproj.gguf \\
        --chat_format mtmd

The arguments are the server's own (``python -m llama_cpp.server --help``). A llama.cpp built
as loadable CPU variants (``GGML_BACKEND_DL``, as edgekd's Makefile builds it) finds them only
beside the executable or in the working directory; this entry point loads them from the
package first (:func:`edgekd.runtime.llamacpp.load_cpu_backend`), then runs the server as it
is. With a build whose CPU backend is linked in, ``python -m llama_cpp.server`` is the same.
"""

from __future__ import annotations


def main() -> None:
    """Load the CPU variant, then hand the command line to ``llama_cpp.server``; a missing
    package is one line and exit status 2."""
    import sys

    from edgekd.errors import EdgeKDError
    from edgekd.runtime.llamacpp import import_llama_cpp

    try:
        import_llama_cpp(what="the llama.cpp server")
        from llama_cpp.server.__main__ import main as serve
    except (EdgeKDError, ImportError) as e:
        hint = "" if isinstance(e, EdgeKDError) else " (pip install 'edgekd[gguf]')"
        print(f"error: {e}{hint}", file=sys.stderr)
        sys.exit(2)
    serve()


if __name__ == "__main__":
    main()
