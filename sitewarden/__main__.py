from sitewarden.cli import main

main()
