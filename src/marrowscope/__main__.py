"""``python -m marrowscope`` runs the command-line interface."""

from marrowscope.cli.main import main

if __name__ == "__main__":
    main()
