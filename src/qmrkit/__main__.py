from .cli import main

# guarded: isolated workers (qmrkit serve --isolate) import the main module again
if __name__ == "__main__":
    raise SystemExit(main())
