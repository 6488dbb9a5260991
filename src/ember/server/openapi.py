"""placeholder"""
def install_openapi(app, state):
    pass
