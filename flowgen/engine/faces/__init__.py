"""The face pass: detecting faces in a decoded image and re-rendering each one."""
