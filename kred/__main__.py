"""`kred` and `python -m kred`: the command line (kred.client.cli), or one line naming the extra it needs."""
import sys


def main() -> None:
    try:
        import typer  # noqa: F401  (the command line is written with it)
    except ImportError:
        sys.exit("error: the kred command needs typer, which the client, cluster and server extras install: "
                 "pip install 'kred[client]'")
    from kred.client.cli import main as cli
    cli()


if __name__ == "__main__":
    main()
